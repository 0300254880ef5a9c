"""Empirical bias correction of a QDQ model (Nagel et al. 2019, "Data-Free Quantization", section 4.2).

Quantizing weights and input activations shifts the mean of a layer's output: E[W_q x_q] != E[W x]. For each
quantized Conv/Gemm, the per-output-channel mean of its output in the QDQ model minus the same mean in the
fp32 model, measured on the calibration images (trimmed: TRIM), is subtracted from its bias: an int32 one behind a
DequantizeLinear (scale s_in * s_w per channel, so the shift is rounded onto that grid; the ort-cpu form) or a
float initializer (the tensorrt form, whose biases onnxruntime leaves unquantized). Sequentially, in graph order: each
layer is measured with the corrections of the layers before it applied, so a layer does not correct a shift
its predecessors have already removed. That is what works: on EfficientNet-Lite0 (ort-cpu, 800 ImageNet images,
exact arithmetic) one pass for all layers took top-1 agreement with fp32 from 96.4% to 80.9%, four layers per
pass to 96.9% but logit SQNR from 20.6 to 17.6 dB, one layer per pass to 98.1% and 24.2 dB. Means are measured with exact Q/DQ arithmetic (ORT graph
optimizations off): that is what the model means, what TensorRT and VNNI CPUs compute; correcting the
saturation of ORT's U8S8 kernels on CPUs without VNNI would bake one CPU's defect into the model.

onnxruntime.quantization has no bias correction (AIMET's needs a PyTorch model and its own quantsim).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from scipy.stats import trim_mean

from ...console import track
from ...core.context import Build
from ...errors import DeployError
from . import center

DQ = "DequantizeLinear"
# calibration images used (their activations are held in memory one layer at a time: about 1 GB for
# EfficientNet-Lite0 at 224 px); on Lite0, 64 did as well as 200
IMAGES = 64
# A channel's shift is the mean of the images' own shifts (int8 minus fp32 mean output, paired by image) without
# this fraction of them at either end: a few images whose activations int8 clips hard otherwise set every image's
# correction (ShuffleNet v1 at 32 px; docs/int8.md)
TRIM = 0.1


def _session(model: onnx.ModelProto, exact: bool):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if exact:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _truncated(model: onnx.ModelProto, outputs: list[str]) -> onnx.ModelProto:
    """`model` computing only `outputs` (onnx.utils.Extractor needs shapes that QDQ models often lack)."""
    nodes = list(model.graph.node)
    producer = {o: k for k, n in enumerate(nodes) for o in n.output}
    needed, stack, keep = set(outputs), list(outputs), set()
    while stack:
        k = producer.get(stack.pop())
        if k is not None and k not in keep:
            keep.add(k)
            fresh = [i for i in nodes[k].input if i and i not in needed]
            needed.update(fresh)
            stack.extend(fresh)
    sub = onnx.ModelProto()
    sub.CopyFrom(model)
    del sub.graph.node[:], sub.graph.output[:], sub.graph.initializer[:]
    sub.graph.node.extend(nodes[k] for k in sorted(keep))
    sub.graph.initializer.extend(i for i in model.graph.initializer if i.name in needed)
    sub.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in outputs)
    return sub


def _image_means(y: np.ndarray) -> np.ndarray:
    """[images, channels]: each image's per-channel (axis 1) mean of `y` over its other axes."""
    return y.reshape(y.shape[0], y.shape[1], -1).mean(axis=2, dtype=np.float64)


def image_means(model: onnx.ModelProto, tensors: list[str], calib: np.ndarray, batch: int,
                exact: bool = True) -> dict[str, np.ndarray]:  # fmt: skip
    """Per image and channel (axis 1), the means of `tensors` on the images `calib`: [images, channels] each."""
    sess = _session(_truncated(model, tensors), exact)
    means: dict[str, list] = {t: [] for t in tensors}
    for i in range(0, len(calib), batch):
        for t, y in zip(tensors, sess.run(tensors, {sess.get_inputs()[0].name: calib[i : i + batch]})):
            means[t].append(_image_means(y))
    return {t: np.concatenate(m) for t, m in means.items()}


class _Layer:
    """A quantized Conv/Gemm of the QDQ model with a constant bias: int32 behind a DequantizeLinear (`bias_dq`, its
    `scale`), or a float initializer (`bias_dq` and `scale` None)."""

    def __init__(self, node: onnx.NodeProto, bias_dq: onnx.NodeProto | None, bias: np.ndarray,
                 scale: np.ndarray | None, ref: str):  # fmt: skip
        self.node, self.bias_dq, self.bias = node, bias_dq, bias
        self.scale = None if scale is None else scale.astype(np.float64)
        self.ref = ref  # the fp32 model's output of the same node

    @property
    def output(self) -> str:
        return self.node.output[0]

    def corrected(self, shift: np.ndarray) -> np.ndarray:
        """The bias with the mean output `shift` removed (rounded onto the int32 grid for a quantized bias)."""
        if self.scale is None:
            return (self.bias - shift).astype(np.float32)
        return self.bias - np.rint(shift / self.scale).astype(np.int64)

    def as_float(self, bias: np.ndarray) -> np.ndarray:
        return bias.astype(np.float64) if self.scale is None else bias * self.scale


def quantized_layers(qmodel: onnx.ModelProto, fp32: onnx.ModelProto) -> tuple[list[_Layer], dict[str, int]]:
    inits = {i.name: numpy_helper.to_array(i) for i in qmodel.graph.initializer}
    producer = {o: n for n in qmodel.graph.node for o in n.output}
    fp32_inits = {i.name: numpy_helper.to_array(i) for i in fp32.graph.initializer}
    # by node name: onnxruntime drops a ReLU/ReLU6 after a Conv (its Q clips) and gives the Conv its output name
    fp32_nodes = {n.name: n for n in fp32.graph.node if n.op_type in ("Conv", "Gemm") and len(n.input) > 2 and n.name}
    centred = center.int8_bias(qmodel, fp32)  # readers of centred activations: their int8 bias is not fp32's
    layers, skipped = [], {}

    def skip(reason: str) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1

    for node in qmodel.graph.node:
        if node.op_type not in ("Conv", "Gemm"):
            continue
        w_dq = producer.get(node.input[1])
        if w_dq is None or w_dq.op_type != DQ or w_dq.input[0] not in inits:
            skip("weights not quantized")
            continue
        bias_name = node.input[2] if len(node.input) > 2 else ""
        b_dq = producer.get(bias_name)
        if b_dq is not None and b_dq.op_type == DQ and inits.get(b_dq.input[0], np.zeros(0)).dtype == np.int32:
            bias, scale = inits[b_dq.input[0]], inits[b_dq.input[1]]
        elif b_dq is None and inits.get(bias_name, np.zeros(0, np.int8)).dtype == np.float32:
            b_dq, bias, scale = None, inits[bias_name], None
        else:
            skip("no constant int32 or float bias")
            continue
        if node.op_type == "Gemm" and any(a.name == "transA" and a.i for a in node.attribute):
            skip("Gemm with transA")
            continue
        ref_node = fp32_nodes.get(node.name)
        ref = fp32_inits.get(ref_node.input[2]) if ref_node is not None else None
        ref = centred[node.name][1] if node.name in centred else ref
        # a bias changed after quantization (the h-sigmoid folded into the SE conv, qdq_placement.py) no
        # longer compares with the fp32 output: leave it alone (an int32 bias is within one step of it)
        tolerance, as_float = (0.0, bias) if scale is None else (scale, bias * scale)
        if ref is None or ref.shape != bias.shape or np.any(np.abs(as_float - ref) > tolerance + 1e-6 * np.abs(ref)):
            skip("bias differs from the fp32 model")
            continue
        bias = bias.astype(np.float64 if scale is None else np.int64)
        layers.append(_Layer(node, b_dq, bias, scale, ref_node.output[0]))
    return layers, skipped


def _set_bias(qmodel: onnx.ModelProto, layer: _Layer, bias: np.ndarray) -> None:
    """Write `bias` (int32 behind the layer's DQ, or float) as the layer's own bias initializer (a shared one is
    copied first)."""
    quantized = layer.bias_dq is not None
    value = bias.astype(np.int32 if quantized else np.float32)
    name = layer.bias_dq.input[0] if quantized else layer.node.input[2]
    users = sum(i == name for n in qmodel.graph.node for i in n.input)
    dq_users = sum(i == layer.bias_dq.output[0] for n in qmodel.graph.node for i in n.input) if quantized else 1
    if users == 1 and dq_users == 1:
        init = next(i for i in qmodel.graph.initializer if i.name == name)
        init.CopyFrom(numpy_helper.from_array(value, name))
        return
    new = f"{layer.output}_corrected_bias"
    qmodel.graph.initializer.append(numpy_helper.from_array(value, new))
    if not quantized:
        layer.node.input[2] = new
        return
    dq = onnx.NodeProto()
    dq.CopyFrom(layer.bias_dq)
    dq.name, dq.input[0], dq.output[0] = f"{new}_DequantizeLinear", new, f"{new}_dq"
    qmodel.graph.node.insert(list(qmodel.graph.node).index(layer.node), dq)
    layer.node.input[2] = dq.output[0]
    layer.bias_dq = dq


def _tensor_types(qmodel: onnx.ModelProto) -> dict[str, int]:
    """Element types of the model's tensors (QuantizeLinear outputs take their zero-point's type)."""
    inferred = onnx.shape_inference.infer_shapes(qmodel)
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.output]}
    inits = {i.name: i.data_type for i in qmodel.graph.initializer}
    for n in qmodel.graph.node:
        if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in inits:
            types[n.output[0]] = inits[n.input[2]]
    return types


class _Stepper:
    """Runs the QDQ model one layer at a time on all images, keeping only the tensors later nodes still need:
    one pass over the network in all, instead of one per layer."""

    def __init__(self, qmodel: onnx.ModelProto, calib: np.ndarray):
        self.model, self.types = qmodel, _tensor_types(qmodel)
        self.inits = {i.name: i for i in qmodel.graph.initializer}
        self.const = set(self.inits)  # initializers and what is computed from them alone (weight DQs)
        self.const_node: dict[str, onnx.NodeProto] = {}
        self.body: list[onnx.NodeProto] = []
        for n in qmodel.graph.node:
            if all(i in self.const for i in n.input if i):
                self.const.update(n.output)
                self.const_node.update({o: n for o in n.output})
            else:
                self.body.append(n)
        self.position = {o: k for k, n in enumerate(self.body) for o in n.output}
        self.last_use = {i: k for k, n in enumerate(self.body) for i in n.input}
        self.last_use.update({o.name: len(self.body) for o in qmodel.graph.output})
        self.live = {qmodel.graph.input[0].name: calib}
        self.done = 0

    def run_to(self, tensor: str) -> np.ndarray:
        """Compute the body up to the node making `tensor` (none for the graph input or a tensor made by an earlier
        call, e.g. a ShuffleNet branch's input); returns it for every image."""
        if tensor not in self.position or self.position[tensor] < self.done:
            return self.live[tensor]
        end = self.position[tensor]
        nodes = self.body[self.done : end + 1]
        made = {o for n in nodes for o in n.output}
        feeds = sorted({i for n in nodes for i in n.input if i and i not in made and i not in self.const})
        fetch = sorted(o for o in made if self.last_use.get(o, -1) > end or o == tensor)
        consts, stack = [], [i for n in nodes for i in n.input if i in self.const_node]
        while stack:
            node = self.const_node[stack.pop()]
            if node not in consts:
                consts.append(node)
                stack.extend(i for i in node.input if i in self.const_node)
        used = {i for n in [*nodes, *consts] for i in n.input}
        graph = onnx.helper.make_graph(
            [n for n in self.model.graph.node if n in consts] + nodes, "layer",
            [onnx.helper.make_tensor_value_info(f, onnx.helper.np_dtype_to_tensor_dtype(self.live[f].dtype), None)
             for f in feeds],
            [onnx.helper.make_tensor_value_info(f, self.types.get(f, onnx.TensorProto.FLOAT), None) for f in fetch],
            [self.inits[i] for i in sorted(used & set(self.inits))])  # fmt: skip
        sub = onnx.helper.make_model(graph, opset_imports=self.model.opset_import, ir_version=self.model.ir_version)
        self.live.update(zip(fetch, _session(sub, exact=True).run(fetch, {f: self.live[f] for f in feeds})))
        for name in [t for t in self.live if self.last_use.get(t, -1) <= end and t != tensor]:
            del self.live[name]
        self.done = end + 1
        return self.live[tensor]


def correct_bias(fp32: Path, int8: Path, calib: np.ndarray, out: Path, images: int = IMAGES, batch: int = 16) -> dict:
    """Write `int8` with empirically corrected biases to `out`; returns a record for the report.

    `fp32` is the model `int8` was quantized from (after equalization, if any); `images` of the calibration
    images, evenly spaced, are used (their activations are held in memory, a layer at a time).
    """
    if len(calib) == 0:
        raise DeployError("bias correction needs calibration images")
    start = time.perf_counter()
    calib = calib[np.unique(np.linspace(0, len(calib) - 1, min(images, len(calib))).round().astype(int))]
    fp32_model, qmodel = onnx.load(str(fp32)), onnx.load(str(int8))
    layers, skipped = quantized_layers(qmodel, fp32_model)
    reference = image_means(fp32_model, [layer.ref for layer in layers], calib, batch, exact=False) if layers else {}
    stepper = _Stepper(qmodel, calib)
    rms_shift = []
    for layer in track(layers, "Bias correction", total=len(layers)):
        y = stepper.run_to(layer.output)
        shift = trim_mean(_image_means(y) - reference[layer.ref], TRIM, axis=0)
        bias = layer.corrected(shift)
        if layer.scale is not None and np.abs(bias).max() >= 2**31:
            skipped["corrected bias overflows int32"] = skipped.get("corrected bias overflows int32", 0) + 1
            continue
        _set_bias(qmodel, layer, bias)
        # the layers after this one see its corrected output: the bias is added last, so shift it the same way
        delta = (layer.as_float(layer.bias) - layer.as_float(bias)).astype(np.float32)
        y -= delta.reshape([-1 if a == 1 else 1 for a in range(y.ndim)])
        rms_shift.append(float(np.sqrt(np.mean(shift**2))))
    onnx.save(qmodel, str(out))
    return {
        "layers": len(rms_shift),
        "skipped": skipped,
        "images": len(calib),
        "trimmed": TRIM,  # of the images at either end of each channel's shifts
        # per corrected layer: RMS over output channels of the mean shift removed
        "rms_shift": {"median": float(np.median(rms_shift)), "max": float(np.max(rms_shift))} if rms_shift else None,
        "seconds": round(time.perf_counter() - start, 1),
    }


class BiasCorrection:
    name = "bias_correction"

    def applies(self, b: Build) -> bool:
        return b.recipe.quantize.enabled and b.recipe.quantize.bias_correction

    def run(self, b: Build) -> str:
        record = correct_bias(b.source, b.int8_onnx, b.calibration.calib.inputs, b.int8_onnx)
        b.report["bias_correction"] = record
        b.int8_changed()
        return f"{record['layers']} layers corrected on {record['images']} calibration images"
