"""``squeezer::sparse_linear`` / ``squeezer::sparse_conv2d``: layers whose weight is stored in CSR.

The storage of pruning in Deep Compression (Han, Mao & Dally, ICLR 2016): only the kept weights are
stored, row by row (``row_ptr``, ``col_idx``); a conv's rows are its output channels and its columns
the flattened (in_channel, kh, kw) window. ``values`` holds either the float weights or — after
weight sharing — uint8 indices into a ``codebook`` (sparse + clustered, "combined" storage).
``block`` records the pattern the pass imposed ((1, 1) unstructured, (16, 1) blocks, ...): codegen
uses it to pick a block-sparse kernel.

The ops' torch reference densifies the weight and calls F.linear / F.conv2d; gradients flow to
``x``, the float ``values`` (the mask stays fixed: pruned weights have no slot), the ``codebook``
(summed over each cluster, the paper's centroid fine-tuning) and ``bias``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .library import CompressedLayer, register_compressed_op
from .lut_linear import check_codebook, codebook_grad, lookup_rows

SPARSE_LINEAR = register_compressed_op("sparse_linear", "y = x @ csr(values|codebook[values]).T + bias")
SPARSE_CONV2D = register_compressed_op("sparse_conv2d", "y = conv2d(x, csr(values|codebook[values]) as (Co,Ci,kh,kw)) + bias")


def csr_rows(row_ptr: torch.Tensor) -> torch.Tensor:
    """Row index of every stored entry."""
    counts = (row_ptr[1:] - row_ptr[:-1]).to(torch.int64)
    return torch.repeat_interleave(torch.arange(len(counts), device=row_ptr.device), counts)


def csr_to_dense(values: torch.Tensor, col_idx: torch.Tensor, row_ptr: torch.Tensor,
                 codebook: Optional[torch.Tensor], n_cols: int) -> torch.Tensor:
    rows = csr_rows(row_ptr)
    vals = lookup_rows(codebook, values.to(torch.int64), rows) if codebook is not None else values
    dense = vals.new_zeros((row_ptr.numel() - 1, n_cols))
    dense[rows, col_idx.to(torch.int64)] = vals
    return dense


def dense_to_csr(weight2d: torch.Tensor, mask2d: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values, col_idx int32, row_ptr int32) of the entries where ``mask2d`` (default: weight != 0)."""
    mask = (weight2d != 0) if mask2d is None else mask2d.to(torch.bool)
    rows, cols = mask.nonzero(as_tuple=True)
    row_ptr = torch.zeros(weight2d.shape[0] + 1, dtype=torch.int64)
    row_ptr[1:] = torch.cumsum(torch.bincount(rows, minlength=weight2d.shape[0]), 0)
    return weight2d[rows, cols].detach().clone(), cols.to(torch.int32), row_ptr.to(torch.int32)


def plain_conv(conv: nn.Conv2d) -> bool:
    """A dense (groups=1) conv with numeric zero padding: what the CSR and codebook convs store."""
    return conv.groups == 1 and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)


def _dense_weight(values, col_idx, row_ptr, codebook, weight_shape):
    k = int(np.prod(weight_shape[1:]))
    return csr_to_dense(values, col_idx, row_ptr, codebook, k).reshape(weight_shape)


def _value_grads(grad_w2d, values, col_idx, row_ptr, codebook):
    rows = csr_rows(row_ptr)
    g = grad_w2d[rows, col_idx.to(torch.int64)]
    if codebook is None:
        return g, None
    return None, codebook_grad(codebook, values.to(torch.int64), g, rows)


# ---- sparse_linear ---------------------------------------------------------------------------------
@torch.library.custom_op("squeezer::sparse_linear", mutates_args=())
def sparse_linear(x: torch.Tensor, values: torch.Tensor, col_idx: torch.Tensor, row_ptr: torch.Tensor,
                  codebook: Optional[torch.Tensor], bias: Optional[torch.Tensor], in_features: int,
                  block: Sequence[int]) -> torch.Tensor:
    return F.linear(x, csr_to_dense(values, col_idx, row_ptr, codebook, in_features), bias)


@sparse_linear.register_fake
def _sparse_linear_fake(x, values, col_idx, row_ptr, codebook, bias, in_features, block):
    return x.new_empty((*x.shape[:-1], row_ptr.shape[0] - 1))


def _sl_setup(ctx, inputs, output):
    x, values, col_idx, row_ptr, codebook, bias, in_features, block = inputs
    ctx.save_for_backward(x, values, col_idx, row_ptr, codebook)
    ctx.in_features, ctx.has_bias = in_features, bias is not None


def _sl_backward(ctx, g):
    x, values, col_idx, row_ptr, codebook = ctx.saved_tensors
    w = csr_to_dense(values, col_idx, row_ptr, codebook, ctx.in_features)
    g2 = g.reshape(-1, g.shape[-1])
    grad_w = g2.T @ x.reshape(-1, x.shape[-1])
    gv, gcb = _value_grads(grad_w, values, col_idx, row_ptr, codebook)
    return g @ w, gv, None, None, gcb, (g2.sum(0) if ctx.has_bias else None), None, None


sparse_linear.register_autograd(_sl_backward, setup_context=_sl_setup)


# ---- sparse_conv2d ---------------------------------------------------------------------------------
@torch.library.custom_op("squeezer::sparse_conv2d", mutates_args=())
def sparse_conv2d(x: torch.Tensor, values: torch.Tensor, col_idx: torch.Tensor, row_ptr: torch.Tensor,
                  codebook: Optional[torch.Tensor], bias: Optional[torch.Tensor], weight_shape: Sequence[int],
                  stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                  block: Sequence[int]) -> torch.Tensor:
    w = _dense_weight(values, col_idx, row_ptr, codebook, list(weight_shape))
    return F.conv2d(x, w, bias, list(stride), list(padding), list(dilation))


@sparse_conv2d.register_fake
def _sparse_conv2d_fake(x, values, col_idx, row_ptr, codebook, bias, weight_shape, stride, padding, dilation, block):
    oh = (x.shape[2] + 2 * padding[0] - dilation[0] * (weight_shape[2] - 1) - 1) // stride[0] + 1
    ow = (x.shape[3] + 2 * padding[1] - dilation[1] * (weight_shape[3] - 1) - 1) // stride[1] + 1
    return x.new_empty((x.shape[0], weight_shape[0], oh, ow))


def _sc_setup(ctx, inputs, output):
    x, values, col_idx, row_ptr, codebook, bias, weight_shape, stride, padding, dilation, block = inputs
    ctx.save_for_backward(x, values, col_idx, row_ptr, codebook)
    ctx.conf = (list(weight_shape), list(stride), list(padding), list(dilation))
    ctx.has_bias = bias is not None


def _sc_backward(ctx, g):
    x, values, col_idx, row_ptr, codebook = ctx.saved_tensors
    shape, stride, padding, dilation = ctx.conf
    w = _dense_weight(values, col_idx, row_ptr, codebook, shape)
    grad_x = torch.nn.grad.conv2d_input(x.shape, w, g, stride, padding, dilation)
    grad_w = torch.nn.grad.conv2d_weight(x, shape, g, stride, padding, dilation)
    gv, gcb = _value_grads(grad_w.reshape(shape[0], -1), values, col_idx, row_ptr, codebook)
    return (grad_x, gv, None, None, gcb, (g.sum((0, 2, 3)) if ctx.has_bias else None),
            None, None, None, None, None)


sparse_conv2d.register_autograd(_sc_backward, setup_context=_sc_setup)


# ---- layers ----------------------------------------------------------------------------------------
class _SparseStorage(CompressedLayer):
    """CSR storage shared by SparseLinear and SparseConv2d."""

    weight_shape: tuple[int, ...]

    def _init_storage(self, values, col_idx, row_ptr, codebook, bias, weight_shape, block) -> None:
        name = type(self).__name__
        n, k = weight_shape[0], int(np.prod(weight_shape[1:]))
        if row_ptr.dtype != torch.int32 or col_idx.dtype != torch.int32:
            raise ValueError(f"{name}: row_ptr and col_idx must be int32")
        if row_ptr.numel() != n + 1 or int(row_ptr[0]) != 0 or int(row_ptr[-1]) != col_idx.numel() \
                or bool((row_ptr[1:] < row_ptr[:-1]).any()):
            raise ValueError(f"{name}: row_ptr must be non-decreasing from 0 to nnz with {n + 1} entries")
        if values.numel() != col_idx.numel():
            raise ValueError(f"{name}: {values.numel()} values but {col_idx.numel()} column indices")
        if col_idx.numel() and (int(col_idx.min()) < 0 or int(col_idx.max()) >= k):
            raise ValueError(f"{name}: column indices must lie in [0, {k})")
        pos = csr_rows(row_ptr) * k + col_idx.to(torch.int64)
        if pos.numel() != torch.unique(pos).numel():
            raise ValueError(f"{name}: a (row, column) position is stored twice")
        if codebook is not None:
            if values.dtype != torch.uint8:
                raise ValueError(f"{name}: with a codebook, values are uint8 cluster indices")
            check_codebook(name, codebook, n, 256)
            if values.numel() and int(values.max()) >= codebook.shape[-1]:
                raise ValueError(f"{name}: indices reach {int(values.max())} but the codebook has {codebook.shape[-1]} entries")
        elif not values.dtype.is_floating_point:
            raise ValueError(f"{name}: values must be float weights (or uint8 indices with a codebook)")
        if bias is not None and tuple(bias.shape) != (n,):
            raise ValueError(f"{name}: bias must have shape ({n},), got {tuple(bias.shape)}")
        if len(block) != 2 or n % block[0] or k % block[1]:
            raise ValueError(f"{name}: block {tuple(block)} does not tile the ({n}, {k}) weight")
        self.weight_shape, self.block = tuple(int(d) for d in weight_shape), (int(block[0]), int(block[1]))
        self.register_buffer("col_idx", col_idx.contiguous())
        self.register_buffer("row_ptr", row_ptr.contiguous())
        if codebook is None:
            self.values = nn.Parameter(values.detach().clone().float())
            self.codebook = None
        else:
            self.register_buffer("values", values.contiguous())
            self.codebook = nn.Parameter(codebook.detach().clone().float())
        self.bias = nn.Parameter(bias.detach().clone().float()) if bias is not None else None

    @property
    def nnz(self) -> int:
        return self.col_idx.numel()

    @property
    def density(self) -> float:
        return self.nnz / max(int(np.prod(self.weight_shape)), 1)

    def decoded_weight(self) -> torch.Tensor:
        return _dense_weight(self.values, self.col_idx, self.row_ptr, self.codebook, list(self.weight_shape))

    def dense_params(self) -> int:
        return int(np.prod(self.weight_shape)) + (self.weight_shape[0] if self.bias is not None else 0)

    def macs(self, input_shape, output_shape) -> int:
        per_out = int(np.prod(output_shape)) // max(self.weight_shape[0], 1)
        return self.nnz * per_out

    def _repr_common(self) -> str:
        per = " per channel" if self.codebook is not None and self.codebook.ndim == 2 else ""
        clusters = f", clusters={self.codebook.shape[-1]}{per}" if self.codebook is not None else ""
        block = f", block={self.block}" if self.block != (1, 1) else ""
        return f"density={self.density:.3f}{block}{clusters}, bias={self.bias is not None}"


class SparseLinear(_SparseStorage):
    """Drop-in for ``nn.Linear`` with CSR weights."""

    op = SPARSE_LINEAR

    def __init__(self, values, col_idx, row_ptr, codebook, bias, in_features: int, block=(1, 1)) -> None:
        super().__init__()
        self._init_storage(values, col_idx, row_ptr, codebook, bias, (row_ptr.numel() - 1, in_features), block)
        self.in_features, self.out_features = in_features, row_ptr.numel() - 1

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None, mask: torch.Tensor | None = None,
                   block=(1, 1)) -> "SparseLinear":
        values, cols, ptr = dense_to_csr(weight.detach().float(), mask)
        return cls(values, cols, ptr, None, bias, weight.shape[1], block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sparse_linear(x, self.values, self.col_idx, self.row_ptr, self.codebook, self.bias,
                             self.in_features, list(self.block))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self._repr_common()}"


class SparseConv2d(_SparseStorage):
    """Drop-in for a dense (groups=1) ``nn.Conv2d`` with CSR weights over (out, in*kh*kw)."""

    op = SPARSE_CONV2D

    def __init__(self, values, col_idx, row_ptr, codebook, bias, weight_shape, stride, padding, dilation,
                 block=(1, 1)) -> None:
        super().__init__()
        if len(weight_shape) != 4:
            raise ValueError(f"SparseConv2d: weight_shape must be (out, in, kh, kw), got {tuple(weight_shape)}")
        self._init_storage(values, col_idx, row_ptr, codebook, bias, weight_shape, block)
        self.stride, self.padding, self.dilation = tuple(stride), tuple(padding), tuple(dilation)
        self.out_channels, self.in_channels = self.weight_shape[0], self.weight_shape[1]
        self.kernel_size = self.weight_shape[2:]

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, mask: torch.Tensor | None = None, block=(1, 1),
                   weight: torch.Tensor | None = None) -> "SparseConv2d":
        if not plain_conv(conv):
            raise ValueError(f"SparseConv2d: only groups=1 convs with numeric zero padding are stored sparse "
                             f"(got groups={conv.groups}, padding={conv.padding!r}, padding_mode={conv.padding_mode!r})")
        w = (conv.weight if weight is None else weight).detach().float()
        values, cols, ptr = dense_to_csr(w.reshape(w.shape[0], -1), None if mask is None else mask.reshape(w.shape[0], -1))
        return cls(values, cols, ptr, None, conv.bias, tuple(w.shape), conv.stride, conv.padding, conv.dilation, block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sparse_conv2d(x, self.values, self.col_idx, self.row_ptr, self.codebook, self.bias,
                             list(self.weight_shape), list(self.stride), list(self.padding), list(self.dilation),
                             list(self.block))

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, {self._repr_common()}")
