"""Compression passes, one module per family. Importing this package registers them by name."""

from .binarization import Binarize, QuantConv2d, QuantLinear, inq_schedule
from .channel_pruning import ChannelPruning, iterative_prune, slimming_penalty
from .low_rank import LowRankSplit

__all__ = ["Binarize", "ChannelPruning", "LowRankSplit", "QuantConv2d", "QuantLinear", "inq_schedule",
           "iterative_prune", "slimming_penalty"]
