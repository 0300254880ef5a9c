"""The histogram onnxruntime's percentile calibration runs with: numpy's counts exactly, and what it does to
onnxruntime's collector."""

import numpy as np
import pytest
from onnxruntime.quantization import calibrate

from deploy.stages.int8.histogram import fast_histograms, histogram


def _ort_edges(rng, first: np.ndarray, amax: float) -> np.ndarray:
    """Edges as onnxruntime's collector grows them: 2048 bins over the first batch, then whole bins added."""
    edges = np.histogram(first, bins=2048)[1].astype(np.float32)
    width = edges[1] - edges[0]
    return np.hstack((edges, np.arange(edges[-1] + width, amax + width, width))).astype(np.float32)


@pytest.mark.parametrize("seed", range(6))
def test_counts_equal_numpys_on_the_edges_onnxruntime_grows(seed):
    rng = np.random.default_rng(seed)
    first = np.abs(rng.standard_t(3, 50_000)).astype(np.float32) * rng.uniform(0.01, 100)
    x = np.abs(rng.standard_t(2, 300_000)).astype(np.float32) * rng.uniform(0.01, 100)
    edges = _ort_edges(rng, first, float(x.max()))
    x[:2000] = rng.choice(edges, 2000)  # on an edge: the bin above it, the last edge in the last bin
    x[2000:2100] = np.nextafter(x[:100], np.float32(0))  # just below one
    x[2100:2200] = rng.uniform(0, edges[0], 100)  # below the first edge: not counted
    if seed % 2:
        x[2200] = np.nan
    got, want = histogram(x.reshape(100, -1), edges), np.histogram(x.reshape(100, -1), bins=edges)
    assert got[0].dtype == want[0].dtype and np.array_equal(got[0], want[0])
    assert got[1] is edges


def test_uneven_edges_and_other_arguments_take_numpys_path():
    x = np.random.default_rng(0).standard_normal(10_000).astype(np.float32)
    uneven = np.array([-3, -1, 0, 0.1, 2, 5], np.float32)
    for args, kwargs in (((uneven,), {}), ((64,), {"range": (-1, 1)}), ((uneven,), {"density": True})):
        got, want = histogram(x, *args, **kwargs), np.histogram(x, *args, **kwargs)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


def test_onnxruntimes_collector_gets_the_same_histograms_and_its_numpy_back():
    rng = np.random.default_rng(1)
    batches = [{"a": [rng.standard_normal((4, 8, 30, 30)).astype(np.float32) * s],
                "b": [np.maximum(rng.standard_t(3, (4, 16, 15, 15)), 0).astype(np.float32) * s]}
               for s in (1.0, 3.0, 0.5, 10.0)]  # fmt: skip  (the range grows: edges are added)
    results = []
    for fast in (False, True):
        collector = calibrate.HistogramCollector("percentile", symmetric=True, num_bins=2048, num_quantized_bins=128,
                                                 percentile=99.999, scenario="same")  # fmt: skip
        if fast:
            with fast_histograms():
                assert calibrate.np is not np
                for b in batches:
                    collector.collect(b)
        else:
            for b in batches:
                collector.collect(b)
        results.append(collector.histogram_dict)
    assert calibrate.np is np
    plain, fast = results
    assert plain.keys() == fast.keys()
    for name in plain:
        assert all(np.array_equal(p, f) for p, f in zip(plain[name], fast[name], strict=True))
        assert len(plain[name][1]) > 2049  # the merge path ran
