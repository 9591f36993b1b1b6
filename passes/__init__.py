"""Compression passes, one module per family. Importing this package registers them by name.

(The families — channel pruning, low-rank splitting, sparsity, clustering, binarization — land
with their own issues; the foundation ships the registry they plug into.)"""

__all__: list[str] = []
