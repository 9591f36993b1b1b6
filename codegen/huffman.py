"""Canonical Huffman codes (code lengths at most 16 bits, stored with the stream): the third stage
of Deep Compression's storage (weight_codec.py). Numpy only."""

from __future__ import annotations

import heapq

import numpy as np

MAX_CODE_BITS = 16


class CodecError(ValueError):
    """Encoded weights that cannot be decoded (or values that cannot be encoded)."""


def huffman_code_lengths(counts: np.ndarray, max_bits: int = MAX_CODE_BITS) -> np.ndarray:
    """Code length per symbol (0 for unused symbols), at most ``max_bits``; a lone symbol gets 1 bit."""
    counts = np.asarray(counts, dtype=np.int64)
    lengths = np.zeros(len(counts), dtype=np.uint8)
    used = np.flatnonzero(counts)
    if len(used) == 0:
        return lengths
    if len(used) == 1:
        lengths[used] = 1
        return lengths
    weights = counts[used].astype(np.float64)
    while True:
        heap = [(w, i, (int(s),)) for i, (w, s) in enumerate(zip(weights, used))]
        heapq.heapify(heap)
        depth = dict.fromkeys((int(s) for s in used), 0)
        tie = len(heap)
        while len(heap) > 1:
            w1, _, s1 = heapq.heappop(heap)
            w2, _, s2 = heapq.heappop(heap)
            for s in s1 + s2:
                depth[s] += 1
            heapq.heappush(heap, (w1 + w2, tie, s1 + s2))
            tie += 1
        if max(depth.values()) <= max_bits:
            for s, d in depth.items():
                lengths[s] = d
            return lengths
        weights = np.ceil(weights / 2) + 1  # flatten the distribution until the longest code fits


def _canonical_codes(lengths: np.ndarray) -> np.ndarray:
    codes = np.zeros(len(lengths), dtype=np.uint32)
    order = sorted((int(l), s) for s, l in enumerate(lengths) if l)
    code, prev = 0, order[0][0] if order else 0
    for i, (l, s) in enumerate(order):
        if i:
            code = (code + 1) << (l - prev)
        codes[s], prev = code, l
    return codes


def huffman_encode(symbols: np.ndarray, alphabet: int) -> tuple[np.ndarray, bytes, int]:
    """(code lengths per symbol, payload bytes, payload bit count)."""
    symbols = np.asarray(symbols, dtype=np.int64).reshape(-1)
    if symbols.size and (symbols.min() < 0 or symbols.max() >= alphabet):
        raise CodecError(f"symbols must lie in [0, {alphabet})")
    lengths = huffman_code_lengths(np.bincount(symbols, minlength=alphabet))
    if symbols.size == 0:
        return lengths, b"", 0
    codes = _canonical_codes(lengths)
    parts = []
    for start in range(0, symbols.size, 1 << 20):  # bounded temporaries on large layers
        chunk = symbols[start:start + (1 << 20)]
        sl, sc = lengths[chunk].astype(np.int64), codes[chunk].astype(np.int64)
        shifts = sl[:, None] - 1 - np.arange(MAX_CODE_BITS)[None, :]
        bits = ((sc[:, None] >> np.maximum(shifts, 0)) & 1).astype(np.uint8)
        parts.append(bits[shifts >= 0])            # row-major: each symbol's bits, MSB first
    bits = np.concatenate(parts)
    return lengths, np.packbits(bits).tobytes(), int(bits.size)


def huffman_decode(lengths: np.ndarray, payload: bytes, nbits: int, count: int) -> np.ndarray:
    """Inverse of :func:`huffman_encode` (``count`` symbols), table-driven."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    if not lengths.any() or lengths.max() > MAX_CODE_BITS:
        raise CodecError("corrupt Huffman table")
    codes = _canonical_codes(lengths.astype(np.uint8))
    table_sym = np.full(1 << MAX_CODE_BITS, -1, dtype=np.int64)
    table_len = np.zeros(1 << MAX_CODE_BITS, dtype=np.int64)
    for s in np.flatnonzero(lengths):
        l = int(lengths[s])
        lo = int(codes[s]) << (MAX_CODE_BITS - l)
        table_sym[lo:lo + (1 << (MAX_CODE_BITS - l))] = s
        table_len[lo:lo + (1 << (MAX_CODE_BITS - l))] = l
    bits = np.unpackbits(np.frombuffer(payload, dtype=np.uint8))[:nbits]
    if bits.size < nbits:
        raise CodecError("truncated Huffman payload")
    padded = np.concatenate([bits, np.zeros(MAX_CODE_BITS, dtype=np.uint8)]).astype(np.int64)
    windows = np.lib.stride_tricks.sliding_window_view(padded, MAX_CODE_BITS)[:nbits]
    window = (windows @ (1 << np.arange(MAX_CODE_BITS - 1, -1, -1))).tolist()
    syms, lens = table_sym.tolist(), table_len.tolist()
    out = [0] * count
    pos = 0
    for i in range(count):
        if pos >= nbits:
            raise CodecError("Huffman payload ends early")
        w = window[pos]
        out[i] = syms[w]
        pos += lens[w]
    if pos != nbits:
        raise CodecError("Huffman payload has trailing bits")
    return np.asarray(out, dtype=np.int64)
