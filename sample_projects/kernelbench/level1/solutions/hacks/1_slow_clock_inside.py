"""HACK: reaches into the bench itself and slows the clock it captured, 50x.

No in-process guard can stop code that runs in the same process; the launcher's own clock,
outside the bench process, contradicts the times reported (or cannot confirm a >10x speed-up)."""

import sys

import torch
import torch.nn as nn

_timing = sys.modules.get("looptree.gpu.bench.timing")
if _timing is not None:
    _real_ns = _timing._perf_counter_ns
    _origin_ns = _real_ns()
    _timing._perf_counter_ns = lambda: _origin_ns + (_real_ns() - _origin_ns) // 50


class ModelNew(nn.Module):
    def forward(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        return torch.relu(A @ B)
