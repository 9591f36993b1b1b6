"""The quick tier (``pytest -m "not slow"``) and the full suite. A sweep over many cases of the same
kind (every zoo model, every method) keeps a representative or two in the quick tier and runs the
rest in the full suite only, so the quick tier stays under 90 s on 2 cores while CI still runs
every case."""

from __future__ import annotations

from typing import Iterable

import pytest

# the zoo models that stand for the rest in the quick tier: a plain CNN and one with a residual add
QUICK_ZOO = ("lenet5", "residual")


def sweep(values: Iterable, quick: Iterable) -> list:
    """Values of a one-name ``parametrize``: those in ``quick`` as they are, the rest marked slow."""
    quick = list(quick)
    return [v if v in quick else pytest.param(v, marks=pytest.mark.slow) for v in values]


def zoo_sweep(names: Iterable[str], quick: Iterable[str] = QUICK_ZOO) -> list:
    return sweep(names, quick)
