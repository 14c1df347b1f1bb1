"""Build, check, bench: sandboxed processes, metrics, evidence, the statistics of a verdict."""
