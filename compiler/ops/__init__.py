"""Compressed layers and their ``squeezer::*`` torch ops (see library.py for the contract)."""

from .library import CompressedLayer, CompressedOp, compressed_ops, register_compressed_op
from .bitserial import BitConv2d, BitLinear, pack_bits, unpack_bits
from .hashed import HashedLinear
from .integer import IntConv2d, IntLinear
from .int4 import Int4Conv2d, Int4Linear
from .lut_linear import LutConv2d, LutLinear, pack_indices, unpack_indices
from .sparse import SparseConv2d, SparseLinear, csr_to_dense, dense_to_csr

__all__ = ["CompressedLayer", "CompressedOp", "compressed_ops", "register_compressed_op", "HashedLinear",
           "IntConv2d", "IntLinear", "Int4Conv2d", "Int4Linear", "LutLinear", "LutConv2d", "pack_indices", "unpack_indices", "BitLinear", "BitConv2d", "pack_bits",
           "unpack_bits", "SparseLinear", "SparseConv2d", "csr_to_dense", "dense_to_csr"]
