"""The verify stage: accuracy of fp32 and int8 on the evaluation images against the recipe's thresholds (and the
user's own metrics), latency on ONNX Runtime, verification on TensorRT or its ORT execution provider when asked,
and the model the build recommends."""

from __future__ import annotations

from .. import deployment, metrics
from ..deployment import OPENVINO, ORT
from ..console import info
from ..core.context import Build
from ..core.report import environment
from ..errors import DeployError
from ..recipe import Recipe
from ..runtimes.ort import OrtCpu, default_threads, exact_int8_kernels
from . import summary


class Verify:
    name = "verify"

    def preflight(self, recipe: Recipe) -> None:
        """Refuse, before any work, a build that is to be verified on an OpenVINO this Python does not have."""
        from ..runtimes import openvino

        if recipe.verify.runtime == "openvino" and not openvino.available():
            option = "--target" if recipe.quantize.target == "openvino" else "--runtime"
            raise DeployError(f"{option} openvino needs OpenVINO: pip install 'edge-deploy[openvino]'")

    def applies(self, b: Build) -> bool:
        return True

    def run(self, b: Build) -> str:
        runtime = b.recipe.verify.runtime
        if runtime == "openvino":  # first: a model that passes there is timed there for the deployment too
            b.report["runtime"] = _on_runtime(b)
        _accuracy_and_latency(b)
        if runtime not in ("ort", "openvino"):
            b.report["runtime"] = _on_runtime(b)
        b.report["size_bytes"] = {
            "fp32": b.fp32_onnx.stat().st_size,
            **({"int8": b.int8_onnx.stat().st_size} if b.int8_onnx else {}),
        }
        if "stages_summary" in b.report:
            summary.after_verify(b)
        return _summary(b.report)


def _accuracy_and_latency(b: Build) -> None:
    r, v, target, threads = b.recipe, b.recipe.verify, b.recipe.quantize.target, b.threads
    b.report["accuracy"] = acc = b.evaluate()
    if "reference" in acc:
        b.warn(_saturation_warning(acc))
    chance = 100.0 / r.model.num_classes
    if "fp32" in acc and acc["fp32"]["top1"] < chance:
        b.warn(f"fp32 top-1 {acc['fp32']['top1']:.2f}% is below chance ({chance:.2f}%): do the validation folders "
               f"name the model's classes? ({b.validation.class_mapping})")  # fmt: skip
    if b.int8_onnx and v.max_top1_drop is not None and "top1_drop" not in acc:
        b.warn(f"verify.max_top1_drop ({v.max_top1_drop}) needs labeled validation images (--val): not checked; "
               "int8 is judged by agreement and SQNR with fp32 only")  # fmt: skip
    missed = metrics.missed_thresholds(v, acc)
    if b.options.evaluate is not None or v.metrics:
        b.report["metrics"], metric_misses = _user_metrics(b, b.options.evaluate)
        missed += metric_misses
    b.report["failures"] += missed

    shape = (3, r.preprocess.input_size, r.preprocess.input_size)
    fp32 = OrtCpu(b.fp32_onnx, threads)
    lat: dict = {"runtime": fp32.name}
    runtimes = [("fp32", fp32)] + ([("int8", OrtCpu(b.int8_onnx, threads))] if b.int8_onnx else [])
    for name, rt in runtimes:
        info(f"  measuring {name} latency ({v.latency.runs} runs)")
        lat[name] = rt.benchmark(shape, v.latency.batch, v.latency.warmup, v.latency.runs).to_dict()
    dep = None
    on = b.report.get("runtime") if v.runtime == "openvino" else None
    if target != "tensorrt" or not b.int8_onnx:  # the build deploys on a CPU: which runtime, precision, threads
        models = {(ORT, "fp32"): b.fp32_onnx}
        if b.int8_onnx and target == "ort-cpu":  # the openvino form is timed on OpenVINO only
            models[(ORT, "int8")] = b.int8_onnx
        if on and on["passed"]:  # verified on OpenVINO: timed there too
            models[(OPENVINO, on["precision"])] = b.int8_onnx or b.fp32_onnx
        if on and on.get("bf16", {}).get("passed"):
            models[(OPENVINO, "bf16")] = b.fp32_onnx
        b.report["deployment"] = dep = _deployment(b, models, missed)
    if b.int8_onnx:
        lat["int8_speedup"] = lat["fp32"]["p50_ms"] / lat["int8"]["p50_ms"]
        lat["int8_throughput_speedup"] = lat["int8"]["throughput_ips"] / lat["fp32"]["throughput_ips"]
        if target == "tensorrt":
            lat["note"] = "the tensorrt-target model on ORT CPU; TensorRT latency comes from the engine on the GPU"
        elif target == "openvino":
            lat["note"] = "the openvino-target model on ORT CPU; its OpenVINO latency is in the deployment grid"
        if on and target == "openvino":
            missed = [*missed, *on["missed"]]
        int8_rows = [g for g in dep["grid"] if g["precision"] == "int8"] if dep else []
        if int8_rows:  # the recommendation's speed figure: int8 (any runtime) and ORT fp32, each at its fastest
            int8_fast = min(int8_rows, key=lambda g: g["batch1_ms"])
            lat["int8_speedup_interleaved"] = deployment.fastest_ms(dep["grid"], "fp32") / int8_fast["batch1_ms"]
            lat["int8_runtime"] = int8_fast["runtime"]
        b.report["recommended"] = rec = recommend(target, missed, lat)
        if rec["precision"] == "fp32":
            b.warn(f"deploy the fp32 model: {rec['reason']}")
        elif target == "ort-cpu" and lat["int8_throughput_speedup"] < 1:
            b.warn(f"int8 is faster at batch 1 but slower at batch {v.latency.batch} "
                   f"({lat['int8_throughput_speedup']:.2f}x throughput) on {fp32.name}")  # fmt: skip
    if dep:
        # the recommended precision, or bf16 on OpenVINO where it passed the thresholds there and is faster
        precisions = {b.report["recommended"]["precision"] if b.int8_onnx else "fp32", "bf16"}
        dep["latency"] = fast = deployment.best([g for g in dep["grid"] if g["precision"] in precisions], "batch1_ms")
        if b.int8_onnx:
            rec = b.report["recommended"]
            if fast["precision"] == "bf16":
                other = f"; int8 {int8_fast['batch1_ms']:.3f} ms on {int8_fast['runtime']}" if int8_rows else ""
                why = (f"the fp32 model in bf16 on OpenVINO is the fastest at batch 1 ({fast['batch1_ms']:.3f} ms"
                       f"{other}), within the accuracy thresholds there")
                rec |= {"model": b.fp32_onnx.name, "precision": "bf16", "reason": why}
            rec |= {"threads": fast["threads"], "runtime": fast["runtime"]}
    b.report["latency"] = lat
    b.report["environment"] = {**environment(fp32.threads), "exact_int8_kernels": exact_int8_kernels()}


def _deployment(b: Build, models: dict, missed: list[str]) -> dict:
    """Every (runtime, precision) model at every thread count up to verify.latency.threads (all cores); the
    throughput pick among the precisions within the accuracy thresholds (the latency pick follows the
    recommendation)."""
    v, size, most = b.recipe.verify.latency, b.recipe.preprocess.input_size, b.threads or default_threads()
    info(f"  timing {', '.join(deployment.startup_key(*m) for m in models)} at {deployment.thread_counts(most)} "
         "threads")  # fmt: skip
    dep = deployment.measure(models, (3, size, size), v.batch, most, max(1, v.runs // 20))
    allowed = [g for g in dep["grid"] if not missed or g["precision"] in ("fp32", "bf16")]
    dep["throughput"] = deployment.best(allowed, "throughput_ips")
    return dep


def _on_runtime(b: Build) -> dict:
    """Accuracy, parity against ORT fp32 and latency of the model on `verify.runtime` (tensorrt | ort-trt |
    openvino)."""
    r, v = b.recipe, b.recipe.verify
    precision = "int8" if b.int8_onnx else "fp32"
    if v.runtime == "tensorrt":
        from ..runtimes.tensorrt import TensorRTEngine

        rt = TensorRTEngine(b.engine)
    elif v.runtime == "openvino":
        from ..runtimes.openvino import OpenVinoCpu

        rt = OpenVinoCpu(b.int8_onnx or b.fp32_onnx, b.threads)
        precision = "int8" if b.int8_onnx else rt.precision.replace("f32", "fp32")
    else:
        from ..runtimes.ort_trt import OrtTensorRT

        rt = OrtTensorRT(b.int8_onnx or b.fp32_onnx, b.workdir / "ort-trt-cache", r.tensorrt.batch,
                         fp16=r.tensorrt.precision == "fp16")  # fmt: skip
    b.evaluate()  # the ORT fp32 logits on the same images: the parity reference
    got = metrics.logits(rt, b.eval_images, v.batch, f"Evaluating on {rt.name}")
    acc = metrics.compare(b.fp32_logits, got, b.eval_images.labels)  # agreement and SQNR against ORT fp32
    shape = (3, r.preprocess.input_size, r.preprocess.input_size)
    lat = rt.benchmark(shape, v.latency.batch, v.latency.warmup, v.latency.runs).to_dict()
    missed = [f"on {rt.name}: {m}" for m in metrics.missed_thresholds(v, acc)]
    b.report["failures"] += missed
    placement = {"placement": rt.placement} if v.runtime == "ort-trt" else {}  # kernel runs per execution provider
    record = {"runtime": rt.name, "precision": precision, "passed": not missed, "missed": missed, "accuracy": acc,
              "latency": lat, **placement}
    if v.runtime == "openvino" and b.int8_onnx and r.quantize.target != "tensorrt":
        record |= _bf16_on_openvino(b)
    return record


def _bf16_on_openvino(b: Build) -> dict:
    """The fp32 model on OpenVINO, which runs it in bf16 on CPUs that have it: a candidate for the deployment when
    within the thresholds (a miss there only leaves it out)."""
    from ..runtimes.openvino import OpenVinoCpu

    rt = OpenVinoCpu(b.fp32_onnx, b.threads)
    if rt.precision != "bf16":
        return {}
    got = metrics.logits(rt, b.eval_images, b.recipe.verify.batch, f"Evaluating fp32 on {rt.name}")
    acc = metrics.compare(b.fp32_logits, got, b.eval_images.labels)
    return {"bf16": {"accuracy": acc, "passed": not metrics.missed_thresholds(b.recipe.verify, acc)}}


def _user_metrics(b: Build, evaluate) -> tuple[dict, list[str]]:
    """The user's `evaluate(predict)` on the fp32 and int8 models, and the recipe's verify.metrics gates missed."""
    gates = b.recipe.verify.metrics
    if evaluate is None:
        b.warn(f"verify.metrics gates {', '.join(gates)} but no evaluate function was given (Python API): unchecked")
        return {}, []
    runtimes = {"fp32": OrtCpu(b.fp32_onnx, b.threads)}
    if b.int8_onnx:
        runtimes["int8"] = OrtCpu(b.int8_onnx, b.threads, reference=b.recipe.quantize.target != "ort-cpu")
    values: dict[str, dict[str, float]] = {}
    for precision, rt in runtimes.items():
        try:
            got = evaluate(metrics.predict_fn(rt, b.recipe.verify.batch))
            values[precision] = {str(k): float(x) for k, x in dict(got).items()}
        except Exception as err:  # noqa: BLE001 - the user's function: its failure fails the build, reported
            return values, [f"evaluate raised {type(err).__name__} on the {precision} model: {str(err)[:200]}"]
    final = values.get("int8", values["fp32"])
    missed = []
    for name, gate in gates.items():
        if name not in final:
            missed.append(f"verify.metrics names {name!r}, which evaluate did not return (it gave {sorted(final)})")
            continue
        drop = values["fp32"][name] - final[name]
        if gate.min is not None and final[name] < gate.min:
            missed.append(f"{name} {final[name]:.4g} < min {gate.min}")
        if gate.max is not None and final[name] > gate.max:
            missed.append(f"{name} {final[name]:.4g} > max {gate.max}")
        if gate.max_drop is not None and "int8" in values and drop > gate.max_drop:
            missed.append(f"int8 {name} drop {drop:.4g} > max_drop {gate.max_drop}")
    return values, missed


# int8 counts as slower below this batch-1 speedup: two sessions of one model differ by up to ~1.5% here
SLOWER = 0.95


def recommend(target: str, missed: list[str], lat: dict) -> dict:
    """The model to deploy (`deploy run` / `serve` pick it from a build folder): int8 unless it misses an
    accuracy threshold or, on a CPU target, runs slower than fp32 at batch 1."""
    int8 = {"model": "model.int8.onnx", "precision": "int8"}
    fp32 = {"model": "model.fp32.onnx", "precision": "fp32"}
    if missed:
        return {**fp32, "reason": "int8 misses " + "; ".join(missed)}
    if target == "tensorrt":
        return {**int8, "reason": "made for TensorRT, which runs it in int8 (ORT CPU runs this form slowly)"}
    speedup, runtime = lat["int8_speedup_interleaved"], lat.get("int8_runtime", lat["runtime"])
    if speedup < SLOWER:
        return {**fp32, "reason": f"int8 is slower than fp32 on {runtime} at batch 1 ({speedup:.2f}x, "
                                  "timed in alternating rounds); its accuracy is within the thresholds"}  # fmt: skip
    return {**int8, "reason": f"within the accuracy thresholds and {speedup:.2f}x the speed of fp32 at batch 1 on "
                              f"{runtime} (timed in alternating rounds)"}  # fmt: skip


def _saturation_warning(acc: dict) -> str:
    exact = acc["reference"]
    if "top1_drop" in acc:
        figures = f"int8 top-1 drop {acc['top1_drop']:.2f} points here vs {exact['top1_drop']:.2f} with exact arithmetic"
    else:
        figures = f"agreement {acc['agreement']:.1f}% here vs {exact['agreement']:.1f}% with exact arithmetic"
    return (
        f"this CPU has no VNNI/AMX int8 dot-product instructions, so ORT's U8S8 kernels saturate: {figures} "
        "(what VNNI/AMX CPUs compute); for deployment on such CPUs set quantize.reduce_range: true or keep fp32"
    )


def _summary(r: dict) -> str:
    acc, lat = r["accuracy"], r["latency"]
    parts = []
    if "fp32" in acc:
        parts.append(f"fp32 top-1 {acc['fp32']['top1']:.2f}%")
    if "int8" in acc:
        parts.append(f"int8 top-1 {acc['int8']['top1']:.2f}% (drop {acc['top1_drop']:.2f})")
    if "agreement" in acc:
        parts.append(f"agreement {acc['agreement']:.1f}%, SQNR {acc['sqnr_db']:.1f} dB")
    parts.append(f"fp32 p50 {lat['fp32']['p50_ms']:.2f} ms")
    if "int8" in lat:
        parts.append(f"int8 p50 {lat['int8']['p50_ms']:.2f} ms ({lat['int8_speedup']:.2f}x)")
    return ", ".join(parts)
