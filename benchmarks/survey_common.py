"""What every row of the survey-methods suite (survey_methods.py) is made from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass
class Context:
    """What every method gets: the traced fp32 model and the demo's data."""

    fp32: Any                  # compiler.Graph of the trained LeNet-5
    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    quick: bool


@dataclass(frozen=True)
class Method:
    name: str
    paper: str
    # -> (compressed compiler.Graph, note[, its fp32 compiler.Graph when not the demo's LeNet-5])
    make: Callable[[Context], tuple]
