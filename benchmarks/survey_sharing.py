"""Rows of the survey-methods suite (survey_methods.py): weight-sharing, sparsity and low-rank-training methods (issue 23: HashedNets, soft weight-sharing, Deep k-Means, VNQ, L0, variational dropout, compression-aware training, Trained Rank Pruning)."""

from __future__ import annotations

from .survey_common import Method

METHODS: tuple[Method, ...] = ()
