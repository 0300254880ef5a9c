"""The deployment a build recommends on ORT CPU: (precision, threads) for latency and throughput, start-up time, and
the thread count serving takes from serving.json."""

import json

import pytest

from deploy import build
from deploy import recipe as recipes
from deploy.deployment import OPENVINO, ORT, best, thread_counts
from deploy.runtimes.ort import default_threads
from deploy.serving.predictor import Predictor
from deploy.stages.verify import SLOWER


def test_thread_counts_are_powers_of_two_up_to_the_cores():
    assert thread_counts(1) == [1]
    assert thread_counts(2) == [1, 2]
    assert thread_counts(6) == [1, 2, 4, 6]
    assert thread_counts(8) == [1, 2, 4, 8]


def _row(precision, threads, ms, ips, runtime=ORT):
    return {"runtime": runtime, "precision": precision, "threads": threads, "batch1_ms": ms, "throughput_ips": ips}


def test_best_prefers_onnxruntime_then_fewer_threads_within_five_percent():
    grid = [_row("fp32", 1, 10.0, 100), _row("fp32", 2, 6.0, 190), _row("int8", 1, 5.1, 200),
            _row("int8", 2, 5.0, 400), _row("int8", 4, 4.9, 390)]  # fmt: skip
    assert best(grid, "batch1_ms") == grid[2]  # 5.1 is within 5% of 4.9: one thread
    assert best(grid, "throughput_ips") == grid[3]  # 390 is within 5% of 400: 2 threads < 4
    assert best(grid[:2], "batch1_ms") == grid[1]  # 10.0 is not within 5% of 6.0
    assert best(grid[:2], "throughput_ips") == grid[1]
    openvino = [_row("int8", 1, 4.7, 300, OPENVINO), _row("int8", 2, 4.0, 500, OPENVINO)]
    assert best([*grid[3:], openvino[0]], "batch1_ms") == grid[4]  # ORT's 4.9 is within 5% of 4.7
    assert best([*grid[3:], *openvino], "batch1_ms") == openvino[1]  # 4.0 is faster by more than 5%


def test_build_times_each_precision_at_each_thread_count_and_serving_uses_the_fastest(tmp_path, small_recipe):
    r = recipes.override(small_recipe, {"quantize.enabled": True, "verify.max_top1_drop": None,
                                        "verify.latency.runs": 20})  # fmt: skip
    out = tmp_path / "out"
    report = build(r, out=out).report
    dep, rec = report["deployment"], report["recommended"]
    counts = thread_counts(default_threads())
    assert sorted((g["precision"], g["threads"]) for g in dep["grid"]) == sorted(
        (p, t) for p in ("fp32", "int8") for t in counts)
    assert all(g["batch1_ms"] > 0 and g["throughput_ips"] > 0 for g in dep["grid"])
    assert set(dep["startup_s"]) == {"fp32", "int8"} and all(0 < s < 60 for s in dep["startup_s"].values())
    # the latency pick is the recommended precision at its fastest thread count (fewer threads within 5%)
    assert dep["latency"]["precision"] == rec["precision"] and rec["threads"] == dep["latency"]["threads"]
    mine = [g for g in dep["grid"] if g["precision"] == rec["precision"]]
    assert dep["latency"]["batch1_ms"] <= 1.05 * min(g["batch1_ms"] for g in mine)
    assert dep["throughput"]["throughput_ips"] >= 0.95 * max(g["throughput_ips"] for g in dep["grid"])
    fp32_best = min(g["batch1_ms"] for g in dep["grid"] if g["precision"] == "fp32")
    int8_best = min(g["batch1_ms"] for g in dep["grid"] if g["precision"] == "int8")
    assert report["latency"]["int8_speedup_interleaved"] == pytest.approx(fp32_best / int8_best)
    md = (out / "report.md").read_text()
    assert "## Deployment on this CPU" in md and f"on {rec['threads']} thread" in md and "start-up s" in md

    spec = json.loads((out / "serving.json").read_text())
    assert spec["threads"] == rec["threads"] and spec["cores"] == default_threads()
    assert Predictor(out).runtime.threads == rec["threads"]
    assert Predictor(out, threads=3).runtime.threads == 3  # an explicit count wins
    spec["cores"] = default_threads() + 1  # measured on another machine: all cores here
    (out / "serving.json").write_text(json.dumps(spec))
    assert Predictor(out).runtime.threads == default_threads()
    spec["threads"] = 0
    (out / "serving.json").write_text(json.dumps(spec))
    with pytest.raises(Exception, match="malformed serving description"):
        Predictor(out)


def test_an_fp32_build_times_fp32_at_each_thread_count(tmp_path, small_recipe):
    report = build(recipes.override(small_recipe, {"verify.max_top1_drop": None}), out=tmp_path / "out").report
    dep = report["deployment"]
    assert {g["precision"] for g in dep["grid"]} == {"fp32"} and dep["latency"]["precision"] == "fp32"
    assert "recommended" not in report or report["recommended"]["precision"] == "fp32"


def test_a_model_verified_on_openvino_is_timed_there_and_served_there_when_fastest(tmp_path, small_recipe):
    pytest.importorskip("openvino")
    from deploy.runtimes.openvino import OpenVinoCpu
    from deploy.runtimes.ort import OrtCpu

    r = recipes.override(small_recipe, {"quantize.enabled": True, "verify.max_top1_drop": None,
                                        "verify.min_agreement": 50.0, "verify.latency.runs": 20,
                                        "verify.runtime": "openvino"})  # fmt: skip
    out = tmp_path / "out"
    report = build(r, out=out).report
    on, dep, rec = report["runtime"], report["deployment"], report["recommended"]
    assert on["runtime"].startswith("openvino-cpu") and on["precision"] == "int8" and on["passed"]
    assert on["accuracy"]["agreement"] >= 50.0 and on["latency"]["p50_ms"] > 0
    # the fp32 model too, where OpenVINO runs it in bf16 (CPUs with bf16): a candidate when within the thresholds
    bf16 = on.get("bf16", {}).get("passed", False)
    assert ("bf16" in on) == (OpenVinoCpu(out / "model.fp32.onnx").precision == "bf16")
    counts = thread_counts(default_threads())
    openvino = ["int8"] + ["bf16"] * bf16
    assert sorted((g["runtime"], g["precision"], g["threads"]) for g in dep["grid"]) == sorted(
        [(ORT, p, t) for p in ("fp32", "int8") for t in counts] + [(OPENVINO, p, t) for p in openvino for t in counts])
    assert set(dep["startup_s"]) == {"fp32", "int8"} | {f"{p} on openvino-cpu" for p in openvino}
    # the latency pick: the precision chosen on ORT (int8 unless slower than fp32), or bf16 on OpenVINO if faster
    chosen = "int8" if report["latency"]["int8_speedup_interleaved"] >= SLOWER else "fp32"
    assert dep["latency"] == best([g for g in dep["grid"] if g["precision"] in (chosen, "bf16")], "batch1_ms")
    assert (rec["precision"], rec["runtime"], rec["threads"]) == tuple(dep["latency"][k] for k in ("precision",
                                                                                                  "runtime", "threads"))
    assert rec["model"] == ("model.int8.onnx" if rec["precision"] == "int8" else "model.fp32.onnx")
    assert "int8 on openvino-cpu" in (out / "report.md").read_text()

    spec = json.loads((out / "serving.json").read_text())
    assert spec.get("runtime", ORT) == rec["runtime"]
    spec["runtime"] = OPENVINO  # as a build that measured OpenVINO fastest writes it
    (out / "serving.json").write_text(json.dumps(spec))
    assert isinstance(Predictor(out).runtime, OpenVinoCpu)
    other = "model.int8.onnx" if spec["model"] == "model.fp32.onnx" else "model.fp32.onnx"
    assert isinstance(Predictor(out / other).runtime, OrtCpu)  # not the model it measured there
    spec["runtime"] = "tflite"
    (out / "serving.json").write_text(json.dumps(spec))
    with pytest.raises(Exception, match="malformed serving description"):
        Predictor(out)


def test_a_model_made_for_openvino_is_verified_timed_and_recommended_there(tmp_path, small_recipe):
    pytest.importorskip("openvino")
    r = recipes.override(small_recipe, {"quantize.enabled": True, "quantize.target": "openvino",
                                        "verify.max_top1_drop": None, "verify.min_agreement": 50.0,
                                        "verify.latency.runs": 20})  # fmt: skip
    out = tmp_path / "out"
    report = build(r, out=out).report
    on, dep, rec = report["runtime"], report["deployment"], report["recommended"]
    assert on["runtime"].startswith(OPENVINO) and on["precision"] == "int8" and on["passed"] and not on["missed"]
    # made for OpenVINO: its int8 is timed there only (ORT runs the form slower than the ort-cpu one)
    assert {(g["runtime"], g["precision"]) for g in dep["grid"]} == {(ORT, "fp32"), (OPENVINO, "int8")} | (
        {(OPENVINO, "bf16")} if on.get("bf16", {}).get("passed") else set())
    int8_best = min(g["batch1_ms"] for g in dep["grid"] if g["precision"] == "int8")
    fp32_best = min(g["batch1_ms"] for g in dep["grid"] if g["precision"] == "fp32")
    assert report["latency"]["int8_speedup_interleaved"] == pytest.approx(fp32_best / int8_best)
    assert report["latency"]["int8_runtime"] == OPENVINO and "openvino-target" in report["latency"]["note"]
    if rec["precision"] == "int8":
        assert rec["runtime"] == OPENVINO and "on openvino-cpu" in rec["reason"]
    spec = json.loads((out / "serving.json").read_text())
    assert spec["model"] == rec["model"] and spec.get("runtime", ORT) == rec["runtime"]

    # missed on OpenVINO: the build fails and recommends the float model
    result = build(recipes.override(r, {"verify.min_sqnr_db": 200.0}), out=tmp_path / "missed")
    failed = result.report
    assert not result.passed and failed["runtime"]["missed"] and not failed["runtime"]["passed"]
    assert any(f.startswith("on openvino-cpu") and "min_sqnr_db" in f for f in failed["failures"])
    assert failed["recommended"]["model"] == "model.fp32.onnx" and "on openvino-cpu" in failed["recommended"]["reason"]
    assert not any(g["precision"] == "int8" for g in failed["deployment"]["grid"])


@pytest.mark.parametrize("option, overrides", [("--runtime", {"verify.runtime": "openvino"}),
                                               ("--target", {"quantize.target": "openvino"})])
def test_openvino_asked_for_but_not_installed_is_one_line_before_any_work(tmp_path, small_recipe, monkeypatch,
                                                                          option, overrides):  # fmt: skip
    from deploy.errors import DeployError
    from deploy.runtimes import openvino

    monkeypatch.setattr(openvino, "available", lambda: False)
    r = recipes.override(small_recipe, {"quantize.enabled": True, **overrides})
    with pytest.raises(DeployError, match=rf"^{option} openvino needs OpenVINO: pip install"):
        build(r, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
