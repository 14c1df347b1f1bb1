"""GPU side of looptree, in three parts that sit at different layers:

- ``looptree.gpu.bench``: helpers that run inside the user's bench process (timing, correctness,
  the metrics CSV); they import nothing of the engine beyond its error classes, and torch only
  when a tensor or a CUDA device is involved;
- ``looptree.gpu.devices``: the engine's side of devices (NVML telemetry, device slots,
  machine-wide device locks);
- ``looptree.gpu.kernelbench``: KernelBench problems as task projects, the bench runner and the
  sweep command, which sit above the engine's core.

Nothing is imported here, so ``import looptree.gpu.bench.timing`` stays light.
"""
