"""Compressed layers and their ``squeezer::*`` torch ops (see library.py for the contract)."""

from .library import CompressedLayer, CompressedOp, compressed_ops, register_compressed_op
from .lut_linear import LutLinear, pack_indices, unpack_indices

__all__ = ["CompressedLayer", "CompressedOp", "compressed_ops", "register_compressed_op",
           "LutLinear", "pack_indices", "unpack_indices"]
