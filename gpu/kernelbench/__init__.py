"""KernelBench: problems to task projects, the bench runner, the sweep CLI."""
