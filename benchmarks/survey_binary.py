"""Rows of the survey-methods suite (survey_methods.py): binary and low-bit methods (issue 23: Network Sketching, Local Binary CNN, ADMM, Tang et al., Bi-Real Net, TBN, Two-Step Quantization)."""

from __future__ import annotations

from .survey_common import Method

METHODS: tuple[Method, ...] = ()
