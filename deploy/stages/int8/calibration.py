"""MSE calibration: per activation tensor, the clipping range that minimizes the expected int8 quantization error.

onnxruntime.quantization calibrates with minmax, percentile, entropy or distribution, but has no MSE range
search (TensorRT's pytorch-quantization and NVIDIA ModelOpt have one, for PyTorch models only). So the
histograms come from onnxruntime's own calibrator (HistogramCollector, signed values, ORT_BINS bins) and only
the search is ours; the ranges are written as an onnxruntime calibration cache (MinMax TensorsData), which
quantize_static then reads instead of calibrating.

The error of a range is integrated over the histogram, each bin's count spread evenly over SUBSAMPLES points
inside it: clipped values cost their distance to the range's end, the others their rounding error on the grid
onnxruntime derives from the range (quant_utils.compute_scale_zp): uint8 with a zero-point over [min(lo, 0),
max(hi, 0)], or int8 symmetric (-127..127) over [-amax, amax].
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

ORT_BINS = 2048
SUBSAMPLES = 4
CANDIDATES = 128  # range ends tried per side, evenly spaced up to the observed extreme


def _points(hist: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Values and weights standing for the histogram: SUBSAMPLES evenly spread points per non-empty bin."""
    keep = hist > 0
    lo, width = edges[:-1][keep].astype(np.float64), np.diff(edges.astype(np.float64))[keep]
    offsets = (np.arange(SUBSAMPLES) + 0.5) / SUBSAMPLES
    values = (lo[:, None] + width[:, None] * offsets[None, :]).ravel()
    weights = np.repeat(hist[keep].astype(np.float64) / SUBSAMPLES, SUBSAMPLES)
    return values, weights / weights.sum()


def _error(values: np.ndarray, weights: np.ndarray, lo: np.ndarray, hi: np.ndarray, symmetric: bool) -> np.ndarray:
    """Expected squared quantization error for each candidate range (lo[k], hi[k])."""
    if symmetric:
        amax = np.maximum(np.abs(lo), np.abs(hi))
        scale, zp, qmin, qmax = amax / 127, np.zeros_like(amax), -127, 127
    else:
        lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)
        scale = (hi - lo) / 255
        zp, qmin, qmax = np.clip(np.rint(-lo / np.where(scale > 0, scale, 1)), 0, 255), 0, 255
    scale = np.where(scale > 0, scale, 1e-12)[:, None]
    q = np.clip(np.rint(values[None, :] / scale) + zp[:, None], qmin, qmax)
    return (((q - zp[:, None]) * scale - values[None, :]) ** 2 * weights[None, :]).sum(axis=1)


def best_range(hist: np.ndarray, edges: np.ndarray, vmin: float, vmax: float, symmetric: bool) -> tuple[float, float]:
    """The (lo, hi) within [vmin, vmax] that minimizes the quantization MSE of the histogram."""
    if hist.sum() == 0 or vmin == vmax:
        return float(vmin), float(vmax)
    values, weights = _points(hist, edges)
    steps = np.arange(1, CANDIDATES + 1) / CANDIDATES
    if symmetric:
        amax = max(abs(vmin), abs(vmax)) * steps
        best = amax[np.argmin(_error(values, weights, -amax, amax, True))]
        return -float(best), float(best)
    lo, hi = min(vmin, 0.0), max(vmax, 0.0)
    for _ in range(3):  # coordinate descent: the best upper end for this lower end, then the other way round
        if hi > 0:
            cand = max(vmax, 0.0) * steps
            hi = float(cand[np.argmin(_error(values, weights, np.full_like(cand, lo), cand, False))])
        if lo < 0:
            cand = min(vmin, 0.0) * steps
            lo = float(cand[np.argmin(_error(values, weights, cand, np.full_like(cand, hi), False))])
    return lo, hi


def write_ranges(model: Path, reader, op_types: list[str] | None, symmetric: bool, cache: Path) -> int:
    """Calibrate `model` with the batches of `reader` (quantize.py's strided reader) and write the MSE ranges of
    every tensor onnxruntime would quantize to `cache`, an onnxruntime calibration cache; returns the tensor count."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorsData, create_calibrator, save_tensors_data

    with tempfile.TemporaryDirectory() as tmp:
        # the entropy calibrator collects signed histograms (collect_value); its own threshold search is not used
        calibrator = create_calibrator(model, op_types, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=CalibrationMethod.Entropy,
                                       extra_options={"num_bins": ORT_BINS, "symmetric": False})  # fmt: skip
        for start in range(len(reader)):
            reader.set_range(start, start + 1)
            calibrator.collect_data(reader)
        histograms = calibrator.collector.get_histogram_dict()
    ranges = {}
    for name, (hist, edges, vmin, vmax, _) in histograms.items():
        lo, hi = best_range(hist, edges, float(vmin), float(vmax), symmetric)
        ranges[name] = (np.array(lo, np.float32), np.array(hi, np.float32))
    save_tensors_data(TensorsData(CalibrationMethod.MinMax, ranges), cache)
    return len(ranges)
