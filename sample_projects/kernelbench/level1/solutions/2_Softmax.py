"""Correct: softmax written out (max-shifted for stability), a template for a fused kernel."""

import torch
import torch.nn as nn


class ModelNew(nn.Module):
    def __init__(self):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shifted = x - x.amax(dim=1, keepdim=True)
        e = shifted.exp_()
        return e.div_(e.sum(dim=1, keepdim=True))
