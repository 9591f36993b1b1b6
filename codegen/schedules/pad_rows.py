"""Zero padding of a small window (3x3 and 5x5 convs, depthwise or grouped) made per band of output rows.

A padded copy of the whole input is one more pass over memory; made just before the output rows
that read it, the padding stays in L2 and the threads share the bands. How many output rows a
band holds decides how often each input row is copied: ``b`` rows read ``b·stride + k - 1``."""

from __future__ import annotations

import math

from tvm import s_tir, tirx

PAD_ROWS_MAX_TAPS = 25      # windows up to 5x5 get their padding made per band of output rows
                            # (efficientnet_b0's 5x5 depthwise: 3 % faster a model; convnext's 7x7: 1 % slower)
MIN_PAD_ROWS = 14           # bands to share between threads when a window's padding is made per band
PAD_BAND_BYTES = 1 << 20    # the padded input rows of one band: kept within L2


def pad_band(height: int, images: int, padded: tuple[int, ...]) -> int:
    """Output rows per band of a window's padding made per band (``padded``: the padded input's
    NHWC shape). A band of ``b`` rows copies ``b·stride + 2`` padded input rows, so one row per
    band copied each input row three times over: 133 µs against 70 for mobilenet_v2's 3x3
    depthwise at 56x56x144. The largest divisor of the height that leaves MIN_PAD_ROWS bands to
    share between threads and a band buffer within PAD_BAND_BYTES (it stays in L2)."""
    if len(padded) != 4:
        return 1
    stride = max(1, padded[1] // height)
    halo = max(0, padded[1] - height * stride)   # the window's extra rows: 2 for a 3x3 at stride 1
    row_bytes = 4 * math.prod(padded[2:])
    for b in range(height, 1, -1):
        if height % b == 0 and images * (height // b) >= MIN_PAD_ROWS \
                and (b * stride + halo) * row_bytes <= PAD_BAND_BYTES:
            return b
    return 1


def padded_shape(sch: s_tir.Schedule, pads: list) -> tuple[int, ...] | None:
    """Static shape of the (first) padded input a reduction reads: None without one, () where
    it is not static."""
    if not pads:
        return None
    shape = sch.get(pads[0].block_rv).writes[0].source.shape
    return tuple(int(d) for d in shape) if all(isinstance(d, tirx.IntImm) for d in shape) else ()
