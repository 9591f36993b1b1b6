"""Kernels: the TE/TIR computations of the compressed ops, one module per family — hand-written
TIR (amx_kernels, popcount_kernels, sparse_kernels: each carries its own schedule), TE (bitserial_te,
lut_te: scheduled by schedules/ or the default rules), and the work split they share."""
