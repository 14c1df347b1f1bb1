import torch
import torch.nn as nn


class Model(nn.Module):
    """ReLU of a matrix product: C = relu(A @ B)."""

    def __init__(self):
        super().__init__()

    def forward(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        return torch.relu(torch.matmul(A, B))


M = 64
K = 96
N = 48


def get_inputs():
    A = torch.randn(M, K)
    B = torch.randn(K, N)
    return [A, B]


def get_init_inputs():
    return []
