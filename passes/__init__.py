"""Compression passes, one module per family. Importing this package registers them by name."""

from .channel_pruning import ChannelPruning

__all__ = ["ChannelPruning"]
