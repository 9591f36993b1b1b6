"""Compression passes, one module per family. Importing this package registers them by name."""

from .channel_pruning import ChannelPruning, iterative_prune, slimming_penalty
from .low_rank import LowRankSplit

__all__ = ["ChannelPruning", "LowRankSplit", "iterative_prune", "slimming_penalty"]
