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
    """``values`` as parameters, those not in ``quick`` marked slow (compared by value, or by the
    first element of a tuple of parameters)."""
    quick = list(quick)
    out = []
    for v in values:
        key = v[0] if isinstance(v, tuple) else v
        out.append(v if key in quick or v in quick else pytest.param(*(v if isinstance(v, tuple) else (v,)),
                                                                     marks=pytest.mark.slow))
    return out


def zoo_sweep(names: Iterable[str], quick: Iterable[str] = QUICK_ZOO) -> list:
    return sweep(names, quick)
