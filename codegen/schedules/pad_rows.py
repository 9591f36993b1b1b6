"""Zero padding of a small window (3x3 convs, depthwise 5x5 too) made per band of output rows,
and a depthwise window's over a small map per (band, block of channels).

A padded copy of the whole input is one more pass over memory; made just before the output rows
that read it, the padding stays in L2 and the threads share the bands. How many output rows a
band holds decides how often each input row is copied: ``b`` rows at stride ``s`` read
``(b - 1)·s + k`` padded rows of a k-row window, so one row per band copies each input row k/s
times over."""

from __future__ import annotations

import math
from typing import NamedTuple

from tvm import s_tir, tirx

from ..threads import available_cores

PAD_ROWS_MAX_TAPS = 9       # windows up to 3x3 get their padding made per band of output rows...
DEPTHWISE_PAD_ROWS_MAX_TAPS = 25  # ...and depthwise ones up to 5x5 (efficientnet_b0: 3 % faster a model;
                                  # convnext's 7x7 ran 1 % slower, its band re-pads 6 rows)
MIN_PAD_ROWS = 14           # bands to share between threads when a window's padding is made per band
PAD_BAND_BYTES = 1 << 20    # the padded input rows of one band: kept within L2


class PaddedInput(NamedTuple):
    """The padded input a reduction reads: its static shape (``()`` where it is not static) and
    bytes per element."""
    shape: tuple[int, ...]
    elem_bytes: int


def padded_input(sch: s_tir.Schedule, pads: list) -> PaddedInput | None:
    """The (first) padded input block's buffer, None without one."""
    if not pads:
        return None
    buf = sch.get(pads[0].block_rv).writes[0].source
    static = all(isinstance(d, tirx.IntImm) for d in buf.shape)
    return PaddedInput(tuple(int(d) for d in buf.shape) if static else (), max(1, buf.dtype.bits // 8))


def max_taps(depthwise: bool) -> int:
    """The largest window whose padding is made per band."""
    return DEPTHWISE_PAD_ROWS_MAX_TAPS if depthwise else PAD_ROWS_MAX_TAPS


def pad_band(height: int, images: int, padded: PaddedInput, blocks: int = 1, block_channels: int | None = None) -> int:
    """Output rows per band (``padded.shape``: the padded input, NHWC). One row per band copied
    each input row three times over for a 3x3 window: 123 µs against 70 for mobilenet_v2's 3x3
    depthwise at 56x56x144 (AMD EPYC, 2 threads). The largest divisor of the height that leaves
    enough tasks to share between threads (MIN_PAD_ROWS, at least two per core: bands times
    ``blocks`` of ``block_channels`` channels each) and a band buffer within PAD_BAND_BYTES (it
    stays in L2)."""
    if len(padded.shape) != 4:
        return 1
    stride = max(1, padded.shape[1] // height)
    halo = max(0, padded.shape[1] - height * stride)   # the window's extra rows: 2 for a 3x3 at stride 1
    row_bytes = padded.elem_bytes * padded.shape[2] * (block_channels or padded.shape[3])
    least = max(MIN_PAD_ROWS, 2 * available_cores())
    for b in range(height, 1, -1):
        if height % b == 0 and images * (height // b) * blocks >= least \
                and (b * stride + halo) * row_bytes <= PAD_BAND_BYTES:
            return b
    return 1


def band_loop(sch: s_tir.Schedule, outer: list, extents: list[int], padded: PaddedInput):
    """The parallel loop over bands of output rows: ``outer`` is [batch..., rows, column tiles];
    the rows are split into bands (``pad_band``), the batch fused with the bands, and the rows of
    a band stay serial inside, next to the column tiles."""
    band = pad_band(extents[len(outer) - 2], math.prod(extents[:len(outer) - 2]), padded)
    if band == 1:
        return sch.fuse(*outer[:-1])
    bands, _ = sch.split(outer[-2], [None, band])
    return sch.fuse(*outer[:-2], bands)


def pads_per_channel_block(padded: PaddedInput) -> bool:
    """Whether a depthwise window pads and sweeps blocks of channels apart: where one image's
    padded input fits a band's buffer (late stages: 7x7x704, 14x14x416, 28x28x240). Each block
    then reads a strided slice of every pixel, which on a large map at batch 16 ran 1.3-1.5x
    slower than bands of all channels (56x56x144, 112x112x96 at stride 2; AMD EPYC)."""
    return len(padded.shape) == 4 and math.prod(padded.shape[1:]) * padded.elem_bytes <= PAD_BAND_BYTES


def band_block_loops(sch: s_tir.Schedule, outer: list, extents: list[int], jo, blocks: int, block_channels: int,
                     padded: PaddedInput):
    """A depthwise window's parallel loop over (images, bands of output rows, channel blocks ``jo``)
    and the serial tile loop inside it (``outer``: [batch..., rows, column tiles]). Each task pads
    and sweeps one block of ``block_channels`` channels of one band, so a late-stage map has tasks
    to share without bands: efficientnet_b0's 5x5 at 7x7x704 took 39 µs as a whole padded copy
    plus one-row tiles of all channels, 17 µs per channel block (AMD EPYC, 2 threads); 14x14x672
    (3x3) 59 against 44 µs."""
    batch, height, columns = outer[:-2], outer[-2], outer[-1]
    rows_extent = extents[len(batch)]
    band = pad_band(rows_extent, math.prod(extents[:len(batch)]), padded, blocks, block_channels)
    if band == rows_extent:
        sch.reorder(*batch, jo, height, columns)
        return (sch.fuse(*batch, jo) if batch else jo), sch.fuse(height, columns)
    bands, rows = sch.split(height, [None, band])
    sch.reorder(*batch, bands, jo, rows, columns)
    return sch.fuse(*batch, bands, jo), sch.fuse(rows, columns)
