"""Activation-range observers for post-training quantization: what range of a layer's input the
integer codes should cover, chosen on calibration batches.

* ``minmax`` — the observed extremes (no value clipped; one outlier widens every step).
* ``percentile`` — the ``p``-th and ``(100 - p)``-th percentiles (clips the tails), as ONNX
  Runtime's and TensorRT's percentile calibrators do.
* ``entropy`` — the clipping threshold that minimizes the KL divergence between the histogram of
  the values and its quantized version (Migacz, "8-bit Inference with TensorRT", GTC 2017; ONNX
  Runtime's and MXNet's entropy calibrators): 2048 bins, candidate thresholds from the level count
  up, the clipped mass folded into the last kept bin. Our codes are asymmetric (a zero point), so
  each tail is searched on its own, measured from the other end of the range (TensorRT searches
  ``|x|`` for symmetric codes; on a normalized image, whose background is a large mass away from 0,
  that clipped the background itself).

Percentiles and histograms come from a fixed-size uniform sample of the values seen (a reservoir
per layer, seeded), so calibration memory does not grow with the data; extremes are exact.
"""

from __future__ import annotations

import numpy as np
import scipy.stats
import torch

OBSERVERS = ("minmax", "percentile", "entropy")
SAMPLE = 1 << 20         # values kept per layer for percentiles and histograms
BINS = 2048


class RangeObserver:
    """Accumulates one tensor's statistics over calibration batches; :meth:`range` gives (lo, hi)."""

    def __init__(self, method: str, percentile: float = 99.99, seed: int = 0) -> None:
        if method not in OBSERVERS:
            raise ValueError(f"observer must be one of {OBSERVERS}, got {method!r}")
        self.method, self.percentile = method, float(percentile)
        self.lo, self.hi, self.seen = float("inf"), float("-inf"), 0
        self.sample = np.empty(0, np.float32)
        self._rng = np.random.default_rng(seed)

    def observe(self, x: torch.Tensor) -> None:
        values = x.detach().float().reshape(-1).cpu().numpy()
        values = values[np.isfinite(values)]
        if values.size == 0:
            return
        self.lo, self.hi = min(self.lo, float(values.min())), max(self.hi, float(values.max()))
        if self.method != "minmax":
            self._keep(values)
        self.seen += values.size

    def _keep(self, values: np.ndarray) -> None:
        """Reservoir-style: the sample stays a uniform draw of everything seen so far."""
        total = self.seen + values.size
        take = min(SAMPLE, total)
        keep_old = int(round(take * self.seen / total)) if total else 0
        keep_old = min(keep_old, self.sample.size)
        old = self._rng.choice(self.sample, keep_old, replace=False) if keep_old < self.sample.size else self.sample
        new_count = min(take - old.size, values.size)
        new = self._rng.choice(values, new_count, replace=False) if new_count < values.size else values
        self.sample = np.concatenate([old, new])

    def range(self, levels: int) -> tuple[float, float]:
        """(lo, hi) for ``levels`` codes (2^bits); raises if nothing finite was observed."""
        if self.seen == 0:
            raise ValueError("no finite values were observed (the layer never ran on the calibration data)")
        if self.method == "minmax":
            return self.lo, self.hi
        if self.method == "percentile":
            p = self.percentile
            return float(np.percentile(self.sample, 100 - p)), float(np.percentile(self.sample, p))
        # each tail on its own, measured from the other end: the codes are asymmetric, and a search
        # on |x| would clip a large off-zero mass (normalized image background) to a wrong value
        lo, hi = min(self.lo, 0.0), max(self.hi, 0.0)
        upper = lo + entropy_threshold(self.sample - lo, levels) if self.hi > 0 else 0.0
        lower = hi - entropy_threshold(hi - self.sample, levels) if self.lo < 0 else 0.0
        return max(lo, min(lower, 0.0)), min(hi, max(upper, 0.0))


def entropy_threshold(magnitudes: np.ndarray, levels: int, bins: int = BINS) -> float:
    """The |x| threshold minimizing KL(P || Q) (module docstring) for ``levels`` quantization levels."""
    top = float(magnitudes.max()) if magnitudes.size else 0.0
    if top <= 0:
        return 0.0
    hist, edges = np.histogram(magnitudes, bins=bins, range=(0.0, top))
    hist = hist.astype(np.float64)
    if bins <= levels:
        return top
    best, best_kl = bins, np.inf
    for i in range(levels, bins + 1):
        p = hist[:i].copy()
        p[i - 1] += hist[i:].sum()                        # clipped mass lands in the last kept bin
        level = np.arange(i) * levels // i                # i bins merged into `levels` levels
        nonzero = hist[:i] > 0
        sums = np.bincount(level, weights=hist[:i], minlength=levels)
        counts = np.bincount(level, weights=nonzero, minlength=levels)
        q = np.where(nonzero, sums[level] / np.maximum(counts[level], 1), 0.0)   # spread over non-empty bins
        if not p.any() or not q[p > 0].all():
            continue
        kl = scipy.stats.entropy(p, q)
        if kl < best_kl:
            best, best_kl = i, kl
    return float(edges[best]) if best < bins else top


def scale_and_zero(lo: float, hi: float, bits: int) -> tuple[float, int]:
    """Asymmetric unsigned codes covering [lo, hi] with 0 exactly representable."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    top = 2 ** bits - 1
    scale = (hi - lo) / top
    if not np.isfinite(scale) or scale <= 1e-12:
        return 1.0, 0 if lo >= 0 else top // 2 + 1
    zero = int(np.clip(round(-lo / scale), 0, top))
    return float(np.float32(scale)), zero
