"""Compression passes, one module per family. Importing this package registers them by name."""

from .channel_pruning import ChannelPruning, iterative_prune, slimming_penalty

__all__ = ["ChannelPruning", "iterative_prune", "slimming_penalty"]
