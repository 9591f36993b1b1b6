"""The compressed-operator library: the contract between passes (which produce compressed layers)
and codegen (which lowers their ops to TVM kernels). Neither side imports the other.

A compressed layer is an ``nn.Module`` that owns compressed storage (packed bits, CSR arrays,
codebook + indices) as buffers/parameters and whose ``forward`` calls one ``squeezer::*`` op
registered with ``torch.library`` (with a fake implementation, so ``torch.export`` keeps it as
one node). Codegen finds the lowering for that node by the op's name.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

NAMESPACE = "squeezer"


@dataclass(frozen=True)
class CompressedOp:
    """A registered ``squeezer::<name>`` op: ``export_key`` is what torch.export nodes are called."""

    name: str
    doc: str

    @property
    def export_key(self) -> str:
        return f"{self.name}.default"


_OPS: dict[str, CompressedOp] = {}


def register_compressed_op(name: str, doc: str) -> CompressedOp:
    op = CompressedOp(name, doc)
    _OPS[name] = op
    return op


def compressed_ops() -> dict[str, CompressedOp]:
    return dict(_OPS)


class CompressedLayer(nn.Module):
    """Base of layers with compressed storage. Tracing keeps them as one ``call_module`` node."""

    op: CompressedOp

    def stored_bytes(self) -> int:
        """Bytes as actually stored: every buffer and parameter at its real dtype (packed included)."""
        return sum(t.numel() * t.element_size() for t in [*self.parameters(), *self.buffers()])

    def dense_params(self) -> int:
        """Number of weights of the dense layer this one stands for (for compression ratios)."""
        raise NotImplementedError

    def macs(self, input_shape: tuple[int, ...], output_shape: tuple[int, ...]) -> int:
        raise NotImplementedError
