"""The deployable encoding of compressed weights (Deep Compression's storage, Han, Mao & Dally,
ICLR 2016, section 2–4) and the runtime layouts the kernels read. Torch-free: a deployed artifact
decodes its weights with numpy alone.

A compressed layer reaches codegen in a *canonical* form (numpy, see :class:`SparseWeights` and
:class:`LutWeights`). It is stored as:

* sparse layers — the positions of the kept weights as *relative indices*: the gap to the previous
  kept weight (row-major over the flattened matrix) in ``index_bits``-bit symbols, where the largest
  symbol ``2**b - 1`` means "skip that many positions, no weight" (the paper's filler zero, made
  unambiguous so decoding is exact; the width giving the fewest bytes is chosen per layer, where
  the paper fixed 8 bits for convs and 5 for fc); then the values: fp32, or cluster indices;
* clustered layers — one cluster index per weight (per kept weight when sparse) and the codebook,
  in fp16 when every centroid is exactly representable (else fp32);
* the gap and index streams Huffman-coded (canonical codes, at most 16 bits, the code lengths
  stored with the stream), as in the paper's third stage.

Decoding gives back the canonical form bit-exactly; a layout function then builds the arrays one
kernel reads (padded CSR, BSR, packed indices...), identically at build time and at load time.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import gpu_layouts
from .huffman import CodecError, huffman_decode, huffman_encode


# ---- canonical layer forms --------------------------------------------------------------------------
@dataclass
class SparseWeights:
    """A (rows, cols) matrix in CSR, columns sorted in each row; ``values`` are fp32 weights or,
    with a ``codebook``, uint8 cluster indices."""

    shape: tuple[int, int]
    row_ptr: np.ndarray
    col_idx: np.ndarray
    values: np.ndarray
    codebook: np.ndarray | None = None
    bias: np.ndarray | None = None

    @classmethod
    def canonical(cls, shape, row_ptr, col_idx, values, codebook=None, bias=None) -> "SparseWeights":
        row_ptr = np.asarray(row_ptr, dtype=np.int32)
        col_idx = np.asarray(col_idx, dtype=np.int32)
        rows = np.repeat(np.arange(shape[0]), np.diff(row_ptr))
        order = np.lexsort((col_idx, rows))
        values = np.asarray(values)[order]
        return cls((int(shape[0]), int(shape[1])), row_ptr, col_idx[order], values,
                   None if codebook is None else np.asarray(codebook, np.float32),
                   None if bias is None else np.asarray(bias, np.float32))

    @property
    def nnz(self) -> int:
        return int(self.col_idx.size)

    def rows(self) -> np.ndarray:
        return np.repeat(np.arange(self.shape[0], dtype=np.int64), np.diff(self.row_ptr))

    def float_values(self) -> np.ndarray:
        if self.codebook is None:
            return self.values.astype(np.float32)
        if self.codebook.ndim == 2:                  # one codebook per output channel (row)
            return self.codebook[self.rows(), self.values.astype(np.int64)]
        return self.codebook[self.values.astype(np.int64)]

    def dense(self) -> np.ndarray:
        w = np.zeros(self.shape, dtype=np.float32)
        w[self.rows(), self.col_idx] = self.float_values()
        return w


@dataclass
class LutWeights:
    """A dense (rows, cols) matrix of cluster indices into ``codebook`` ((k,) shared or (rows, k)
    per output channel), bit width ``bits``."""

    shape: tuple[int, int]
    bits: int
    indices: np.ndarray            # (rows, cols) uint8
    codebook: np.ndarray
    bias: np.ndarray | None = None

    def dense(self) -> np.ndarray:
        idx = self.indices.astype(np.int64)
        if self.codebook.ndim == 2:
            return np.take_along_axis(self.codebook, idx, axis=1).astype(np.float32)
        return self.codebook[idx].astype(np.float32)


# ---- encoding -------------------------------------------------------------------------------------------
@dataclass
class Blob:
    """One encoded layer: JSON-able ``meta`` and named byte streams."""

    meta: dict
    streams: dict[str, bytes] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(len(b) for b in self.streams.values())


def _codebook_bytes(cb: np.ndarray) -> tuple[str, bytes]:
    cb = np.asarray(cb, dtype=np.float32).reshape(-1)
    half = cb.astype(np.float16)
    if np.array_equal(half.astype(np.float32), cb):
        return "float16", half.tobytes()
    return "float32", cb.astype(np.float32).tobytes()


def _huffman_streams(name: str, symbols: np.ndarray, alphabet: int, meta: dict, streams: dict) -> None:
    lengths, payload, nbits = huffman_encode(symbols, alphabet)
    streams[f"{name}.lengths"] = lengths.tobytes()
    streams[name] = payload
    meta[name] = {"alphabet": alphabet, "count": int(np.asarray(symbols).size), "nbits": nbits}


def _huffman_read(name: str, meta: dict, streams: dict) -> np.ndarray:
    info = meta[name]
    lengths = np.frombuffer(streams[f"{name}.lengths"], dtype=np.uint8)
    if len(lengths) != info["alphabet"]:
        raise CodecError(f"stream {name}: code table has {len(lengths)} entries, expected {info['alphabet']}")
    return huffman_decode(lengths, streams[name], info["nbits"], info["count"])


def encode(w: SparseWeights | LutWeights, *, index_bits: int = 5) -> Blob:
    """The Deep Compression encoding of one layer (see the module docstring)."""
    meta: dict = {"shape": list(w.shape)}
    streams: dict[str, bytes] = {}
    if isinstance(w, SparseWeights):
        if not 2 <= index_bits <= 12:
            raise CodecError(f"index_bits={index_bits} must be in [2, 12]")
        meta.update(kind="sparse", index_bits=index_bits, nnz=w.nnz)
        pos = w.rows() * w.shape[1] + w.col_idx.astype(np.int64)
        gaps = np.diff(pos, prepend=-1) - 1
        esc = (1 << index_bits) - 1
        n_esc = gaps // esc
        # each gap g -> g // E escape symbols, then g % E
        sym = np.empty(int(n_esc.sum()) + len(gaps), dtype=np.int64)
        ends = np.cumsum(n_esc + 1) - 1
        sym[:] = esc
        sym[ends] = gaps % esc
        _huffman_streams("gaps", sym, esc + 1, meta, streams)
        if w.codebook is not None:
            meta["codebook_dtype"], streams["codebook"] = _codebook_bytes(w.codebook)
            meta["codebook_shape"] = list(w.codebook.shape)
            meta["clusters"] = int(w.codebook.shape[-1])
            _huffman_streams("values", w.values, meta["clusters"], meta, streams)
        else:
            streams["values"] = w.values.astype(np.float32).tobytes()
    else:
        meta.update(kind="lut", bits=w.bits)
        meta["codebook_dtype"], streams["codebook"] = _codebook_bytes(w.codebook)
        meta["codebook_shape"] = list(w.codebook.shape)
        meta["clusters"] = int(w.codebook.shape[-1])
        _huffman_streams("indices", w.indices.reshape(-1), meta["clusters"], meta, streams)
    if w.bias is not None:
        streams["bias"] = w.bias.astype(np.float32).tobytes()
    return Blob(meta, streams)


def encode_smallest(w: SparseWeights | LutWeights, *, index_bits: tuple[int, ...] = (3, 4, 5, 6, 7, 8),
                    max_tries_nnz: int = 200_000) -> Blob:
    """:func:`encode` with the relative-index width that gives the fewest bytes (the paper fixed 8
    bits for convs and 5 for fc layers; the best width depends on the sparsity). Layers with more
    than ``max_tries_nnz`` kept weights use 5 bits without trying."""
    if not isinstance(w, SparseWeights) or w.nnz > max_tries_nnz:
        return encode(w)
    return min((encode(w, index_bits=b) for b in index_bits), key=lambda blob: blob.nbytes)


def decode(blob: Blob) -> SparseWeights | LutWeights:
    meta, streams = blob.meta, blob.streams
    shape = (int(meta["shape"][0]), int(meta["shape"][1]))
    bias = np.frombuffer(streams["bias"], dtype=np.float32).copy() if "bias" in streams else None
    codebook = (np.frombuffer(streams["codebook"], dtype=meta["codebook_dtype"]).astype(np.float32)
                .reshape(meta.get("codebook_shape", [-1])) if "codebook" in streams else None)
    if meta["kind"] == "sparse":
        esc = (1 << meta["index_bits"]) - 1
        sym = _huffman_read("gaps", meta, streams)
        step = sym + (sym != esc)
        pos = np.cumsum(step)[sym != esc] - 1
        if len(pos) != meta["nnz"] or (len(pos) and pos[-1] >= shape[0] * shape[1]):
            raise CodecError("sparse positions do not match the layer's shape / nnz")
        rows, cols = pos // shape[1], pos % shape[1]
        row_ptr = np.zeros(shape[0] + 1, dtype=np.int32)
        row_ptr[1:] = np.cumsum(np.bincount(rows, minlength=shape[0]))
        if codebook is not None:
            values = _huffman_read("values", meta, streams).astype(np.uint8)
        else:
            values = np.frombuffer(streams["values"], dtype=np.float32).copy()
        if len(values) != meta["nnz"]:
            raise CodecError("value stream length does not match nnz")
        return SparseWeights(shape, row_ptr, cols.astype(np.int32), values, codebook, bias)
    if meta["kind"] == "lut":
        idx = _huffman_read("indices", meta, streams).astype(np.uint8).reshape(shape)
        return LutWeights(shape, int(meta["bits"]), idx, codebook, bias)
    raise CodecError(f"unknown encoded layer kind {meta['kind']!r}")


# ---- runtime layouts (what each kernel reads) ----------------------------------------------------------
def csr_padded(w: SparseWeights, lanes: int) -> dict[str, np.ndarray]:
    """CSR with each row padded to a multiple of ``lanes`` (zero weights at column 0), ``ptr`` in
    chunks of ``lanes``: the vector-gather kernel reads one chunk per step. Column indices are
    uint16 when they fit (the kernel is memory-bound: fewer bytes is faster), else int32."""
    counts = np.diff(w.row_ptr).astype(np.int64)
    padded = -(-counts // lanes) * lanes
    total = int(padded.sum())
    starts = np.concatenate([[0], np.cumsum(padded)[:-1]])
    dest = np.repeat(starts, counts) + (np.arange(w.nnz) - np.repeat(w.row_ptr[:-1].astype(np.int64), counts))
    idx_dtype = np.uint16 if w.shape[1] <= 65536 else np.int32
    cols = np.zeros(max(total, lanes), dtype=idx_dtype)
    cols[dest] = w.col_idx
    if w.codebook is not None:
        if w.codebook.shape[-1] >= 256:
            raise CodecError("csr_padded needs a spare cluster index for padding: at most 255 clusters "
                             "(use csr_chunked)")
        vals = np.zeros(max(total, lanes), dtype=np.uint8)
        vals[dest] = w.values
        vals[total:] = 0
        # padding points at a zero weight only if the codebook has one; else it multiplies x[0] by
        # codebook[0] -- so padded slots get a dedicated zero entry appended to the codebook
        k = w.codebook.shape[-1]
        cb = np.concatenate([w.codebook, np.zeros((*w.codebook.shape[:-1], 1), np.float32)], axis=-1).astype(np.float32)
        pad_slot = np.ones(len(vals), dtype=bool)
        pad_slot[dest] = False
        vals[pad_slot] = k
        out = {"values": vals, "codebook": cb}
    else:
        vals = np.zeros(max(total, lanes), dtype=np.float32)
        vals[dest] = w.values
        out = {"values": vals}
    ptr = np.zeros(w.shape[0] + 1, dtype=np.int32)
    ptr[1:] = np.cumsum(padded // lanes)
    out.update(col_idx=cols, row_ptr=ptr)
    return out


def padded_entries(w: SparseWeights, lanes: int) -> int:
    """Stored entries of :func:`csr_padded` (each row rounded up to a multiple of ``lanes``)."""
    return max(int((-(-np.diff(w.row_ptr).astype(np.int64) // lanes) * lanes).sum()), lanes)


def chunk_bounds(w: SparseWeights, lanes: int = 16, span: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(first entry, length) of every :func:`csr_chunked` chunk: up to ``lanes`` entries of one row
    whose columns lie within ``span`` of the first."""
    cols = w.col_idx.astype(np.int64)
    starts, lens = [], []
    for r in range(w.shape[0]):
        s, end = int(w.row_ptr[r]), int(w.row_ptr[r + 1])
        while s < end:
            reach = int(np.searchsorted(cols[s:min(s + lanes, end)], cols[s] + span - 1, side="right"))
            starts.append(s)
            lens.append(reach)
            s += reach
    return np.asarray(starts, dtype=np.int64), np.asarray(lens, dtype=np.int64)


def csr_chunked(w: SparseWeights, lanes: int = 16, span: int = 256, codebook_size: int = 0) -> dict[str, np.ndarray]:
    """CSR in chunks of up to ``lanes`` stored weights of one row whose columns lie within
    ``span`` of the chunk's first: a column is ``base[chunk] + offset`` with a uint8 offset, so
    an index costs one byte instead of two or four (the batch-1 kernel is memory-bound). Chunks
    are zero-padded to ``lanes``; ``count`` gives the real entries; ``row_ptr`` counts chunks; the
    codebook is zero-padded to ``codebook_size`` (a vector register for an in-register lookup)."""
    counts = np.diff(w.row_ptr).astype(np.int64)
    cols = w.col_idx.astype(np.int64)
    starts, lens_a = chunk_bounds(w, lanes, span)
    n_chunks = len(starts)
    src = np.repeat(starts, lens_a) + (np.arange(int(lens_a.sum())) - np.repeat(np.cumsum(lens_a) - lens_a, lens_a))
    dest = np.repeat(np.arange(n_chunks) * lanes, lens_a) + (src - np.repeat(starts, lens_a))
    total = max(n_chunks, 1) * lanes
    base = cols[starts] if n_chunks else np.zeros(1, np.int64)
    offsets = np.zeros(total, dtype=np.uint8)
    offsets[dest] = cols[src] - np.repeat(base[:n_chunks], lens_a)
    vals = np.zeros(total, dtype=np.uint8 if w.codebook is not None else np.float32)
    vals[dest] = w.values[src]
    chunk_rows = np.repeat(np.arange(w.shape[0]), counts)[starts] if n_chunks else np.zeros(0, np.int64)
    ptr = np.zeros(w.shape[0] + 1, dtype=np.int32)
    ptr[1:] = np.cumsum(np.bincount(chunk_rows, minlength=w.shape[0]))
    out = {"values": vals, "offsets": offsets, "base": base.astype(np.int32),
           "count": np.append(lens_a, [0] * (n_chunks == 0)).astype(np.uint8), "row_ptr": ptr}
    if w.codebook is not None:
        k = w.codebook.shape[-1]
        out["codebook"] = np.zeros((*w.codebook.shape[:-1], max(codebook_size, k)), dtype=np.float32)
        out["codebook"][..., :k] = w.codebook
    return out


def csr_plain(w: SparseWeights) -> dict[str, np.ndarray]:
    out = {"values": w.values if w.codebook is not None else w.values.astype(np.float32),
           "col_idx": w.col_idx.astype(np.int32), "row_ptr": w.row_ptr.astype(np.int32)}
    if w.nnz == 0:  # kernels need non-empty buffers
        out["values"] = np.zeros(1, dtype=out["values"].dtype)
        out["col_idx"] = np.zeros(1, dtype=np.int32)
    if w.codebook is not None:
        out["codebook"] = w.codebook.astype(np.float32)
    return out


def bsr(w: SparseWeights, block: tuple[int, int]) -> dict[str, np.ndarray]:
    """Block-sparse rows: every (r, c) block holding a kept weight is stored whole, transposed to
    (nnz_blocks, c, r) so the kernel's vector loop over r reads contiguous memory."""
    r, c = block
    n, k = w.shape
    rows, cols = w.rows(), w.col_idx.astype(np.int64)
    bkey = (rows // r) * (k // c) + cols // c
    keys = np.unique(bkey)
    brow, bcol = keys // (k // c), keys % (k // c)
    slot = np.searchsorted(keys, bkey)
    data = np.zeros((max(len(keys), 1), c, r), dtype=np.float32)
    data[slot, cols % c, rows % r] = w.float_values()
    ptr = np.zeros(n // r + 1, dtype=np.int32)
    ptr[1:] = np.cumsum(np.bincount(brow, minlength=n // r))
    return {"data": data, "block_col": (bcol if len(keys) else np.zeros(1)).astype(np.int32), "block_ptr": ptr}


def dense_t(w: SparseWeights | LutWeights, transpose: bool = False) -> dict[str, np.ndarray]:
    """The decoded weight (``transpose``: as (cols, rows), what a matmul reads), for layers where
    the dense kernel measured faster."""
    d = w.dense()
    return {"weight": np.ascontiguousarray(d.T) if transpose else d}


def lut_packed_t(w: LutWeights, pad_rows: int = 1, codebook_size: int = 0, tile: int = 0) -> dict[str, np.ndarray]:
    """Indices packed ``8 // bits`` per byte along the reduction axis, byte-major (bytes, rows),
    so a vector of outputs reads contiguous bytes; rows padded to a multiple of ``pad_rows`` and
    the codebook zero-padded to ``codebook_size`` entries (a full vector register). With ``tile``,
    stored tile-major (rows / tile, bytes, tile): one kernel task then streams one contiguous
    block instead of striding a page per step (which defeats the hardware prefetchers)."""
    per = 8 // w.bits
    n, k = w.shape
    n_p = -(-n // pad_rows) * pad_rows
    idx = np.zeros((n_p, -(-k // per) * per), dtype=np.uint16)
    idx[:n, :k] = w.indices
    idx = idx.reshape(n_p, -1, per) << (np.arange(per, dtype=np.uint16) * w.bits)
    packed = idx.sum(-1).astype(np.uint8)
    k = w.codebook.shape[-1]
    if w.codebook.ndim == 2:          # per output channel: rows padded like the indices
        cb = np.zeros((n_p, max(codebook_size, k)), dtype=np.float32)
        cb[:n, :k] = w.codebook
    else:
        cb = np.zeros(max(codebook_size, k), dtype=np.float32)
        cb[:k] = w.codebook
    packed_t = np.ascontiguousarray(packed.T)
    if tile:
        packed_t = np.ascontiguousarray(packed_t.reshape(packed_t.shape[0], n_p // tile, tile).transpose(1, 0, 2))
    out = {"packed_t": packed_t, "codebook": cb}
    if w.bias is not None and n_p != n:
        out["bias"] = np.concatenate([w.bias, np.zeros(n_p - n, np.float32)]).astype(np.float32)
    return out


def csr_narrow(w: SparseWeights) -> dict[str, np.ndarray]:
    """CSR with 16-bit column indices where they fit (the CUDA warp-per-row kernel)."""
    return gpu_layouts.csr_narrow(w.row_ptr, w.col_idx, w.values, w.shape[1], w.codebook)


def csr_rows(w: SparseWeights) -> dict[str, np.ndarray]:
    """:func:`csr_narrow` with the rows' visiting order (the CUDA CSR SpMM, batch > 8)."""
    return gpu_layouts.csr_rows(w.row_ptr, w.col_idx, w.values, w.shape[1], w.codebook)


def lut_rows(w: LutWeights) -> dict[str, np.ndarray]:
    """Indices as the CUDA LUT GEMV reads them (gpu_layouts.lut_rows) and the codebook."""
    return {"words": gpu_layouts.lut_rows(w.indices, w.bits), "codebook": w.codebook.astype(np.float32)}


def lut_tiles(w: LutWeights, tile: int) -> dict[str, np.ndarray]:
    """Indices as the CUDA LUT GEMM reads them (gpu_layouts.lut_gemm_tiles) and the codebook."""
    return {"words": gpu_layouts.lut_gemm_tiles(w.indices, w.bits, tile), "codebook": w.codebook.astype(np.float32)}


LAYOUTS: dict[str, Callable[..., dict[str, np.ndarray]]] = {
    "csr_padded": csr_padded, "csr_chunked": csr_chunked, "csr": csr_plain, "bsr": bsr, "dense": dense_t, "lut_packed_t": lut_packed_t,
    "csr16": csr_narrow, "csr16_rows": csr_rows, "lut_rows": lut_rows,
    "lut_tiles": lut_tiles,
}


def layout(w: SparseWeights | LutWeights, name: str, **options) -> dict[str, np.ndarray]:
    if name not in LAYOUTS:
        raise CodecError(f"unknown weight layout {name!r}; known: {sorted(LAYOUTS)}")
    if "block" in options:
        options["block"] = tuple(options["block"])
    out = LAYOUTS[name](w, **options)
    if w.bias is not None:
        out.setdefault("bias", w.bias.astype(np.float32))
    return out


# ---- the weights file -------------------------------------------------------------------------------------
def write_blobs(blobs: dict[str, Blob], f: io.BufferedIOBase) -> dict:
    """Write every stream back to back; returns the index (meta + offsets) for the manifest."""
    index, offset = {}, 0
    for key, blob in blobs.items():
        entry = {"meta": blob.meta, "streams": {}}
        for name, data in blob.streams.items():
            f.write(data)
            entry["streams"][name] = [offset, len(data)]
            offset += len(data)
        index[key] = entry
    return index


def read_blobs(index: dict, data: bytes) -> dict[str, Blob]:
    blobs = {}
    for key, entry in index.items():
        streams = {}
        for name, (off, length) in entry["streams"].items():
            if off < 0 or off + length > len(data):
                raise CodecError(f"layer {key}: stream {name} lies outside the weights file")
            streams[name] = data[off:off + length]
        blobs[key] = Blob(entry["meta"], streams)
    return blobs
