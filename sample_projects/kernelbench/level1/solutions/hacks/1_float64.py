"""HACK: computes in float64 and hands the float64 result back: closer to any reference, so it
would pass a loose check on values alone. The output's dtype must be the reference's."""

import torch
import torch.nn as nn


class ModelNew(nn.Module):
    def forward(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        return torch.relu(A.double() @ B.double())
