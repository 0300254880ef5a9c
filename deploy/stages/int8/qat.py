"""Quantization-aware training: fine-tune with fake quantization and distillation from the fp32 model.

Used when post-training quantization misses the recipe's accuracy threshold (`quantize.qat`). The model is
BN-folded, captured with torch.export and given fake-quantize nodes by torchao's PT2E QAT path
(`prepare_qat_pt2e`) with a quantizer that puts them where onnxruntime's quantizer will put Q/DQ for the
target (TargetQuantizer), then trained with the project's loop (train.fit) on the distillation loss toward the
fp32 model. The fine-tuned float weights go back into the (BN-folded) PyTorch model: the pipeline exports and
quantizes that model with quantize.quantize as usual, so the int8 model keeps every placement rule of the
target. Weights are fake-quantized with onnxruntime's rule (per output channel, symmetric, scale =
max|w| / 127, round half to even), so the int8 weights ORT writes are the ones the network was trained with
(but for values within an ulp of a rounding tie: ORT divides by the scale, torch multiplies by its inverse).
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from ... import distributed, sources
from ...console import info
from ...core.context import PREPARED, Build
from ...core.report import figures
from ...errors import DeployError
from ...metrics import missed_thresholds
from ...recipe import QATConfig, Target, TrainConfig
from .. import fold_bn
from ..export_onnx import export
from .pad_channels import PadDepthwise
from .quantize import Quantize

aten = torch.ops.aten
_CONV = {aten.conv1d.default, aten.conv2d.default, aten.linear.default}
_ADD = {aten.add.Tensor, aten.add_.Tensor}
_MUL = {aten.mul.Tensor, aten.mul_.Tensor}
_DROPOUT = {aten.dropout.default, aten.dropout_.default}
# activations that onnxruntime removes after a Conv/Gemm (QDQ "removable activations"): the Conv output takes
# their range; and h-sigmoid, which quantize.py folds into the squeeze-excite Conv (qdq_placement)
_FUSED_AFTER_CONV = {aten.relu.default, aten.relu_.default, aten.hardtanh.default, aten.hardtanh_.default,
                     aten.hardsigmoid.default, aten.hardsigmoid_.default}  # fmt: skip
# ops whose output onnxruntime quantizes on the ort-cpu target (it quantizes every op it has a QDQ rule for);
# SiLU is exported as Sigmoid -> Mul, whose output is quantized
_QUANTIZED_OUTPUT = _CONV | _ADD | _MUL | _FUSED_AFTER_CONV | {
    aten.hardswish.default, aten.hardswish_.default, aten.sigmoid.default, aten.sigmoid_.default,
    aten.silu.default, aten.silu_.default,
    aten.adaptive_avg_pool2d.default, aten.mean.dim, aten.avg_pool2d.default, aten.max_pool2d.default,
    aten.cat.default,
}  # fmt: skip


def _specs(target: Target):
    """(activation, weight) QuantizationSpecs with onnxruntime's rules for the target (quant_utils.compute_scale_zp):
    weights int8 symmetric per output channel on [-127, 127] (scale = max|w| / 127, from the current weights at
    every step); activations uint8 asymmetric (ort-cpu, openvino) or int8 symmetric on [-127, 127] with zero-point 0
    (tensorrt), from moving-average min/max."""
    from torchao.quantization.pt2e import (
        FakeQuantize,
        MovingAverageMinMaxObserver,
        MovingAveragePerChannelMinMaxObserver,
    )
    from torchao.quantization.pt2e.quantizer import QuantizationSpec

    weight = QuantizationSpec(
        dtype=torch.int8, quant_min=-127, quant_max=127, qscheme=torch.per_channel_symmetric, ch_axis=0,
        observer_or_fake_quant_ctr=FakeQuantize.with_args(observer=MovingAveragePerChannelMinMaxObserver,
                                                          averaging_constant=1.0),
    )  # fmt: skip
    if target == "tensorrt":
        act = dict(dtype=torch.int8, quant_min=-127, quant_max=127, qscheme=torch.per_tensor_symmetric)
    else:
        act = dict(dtype=torch.uint8, quant_min=0, quant_max=255, qscheme=torch.per_tensor_affine)
    activation = QuantizationSpec(**act, observer_or_fake_quant_ctr=FakeQuantize.with_args(
        observer=MovingAverageMinMaxObserver))  # fmt: skip
    return activation, weight


def target_quantizer(target: Target):
    """A torchao PT2E Quantizer that fake-quantizes what onnxruntime quantizes for `target` (quantize.py).

    tensorrt, openvino: the inputs of Conv/Linear (activation and weight) and both inputs of Add (conv_inputs_only).
    ort-cpu: also the outputs of every op ORT quantizes, a Conv's output taken after the ReLU / h-sigmoid it
    fuses with. torchao's own quantizers (X86InductorQuantizer) use int8 weights on [-128, 127], a grid ORT
    does not produce, and their own placement, hence this one."""
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, Quantizer

    activation, weight = _specs(target)

    class TargetQuantizer(Quantizer):
        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            for n in model.graph.nodes:
                if n.op != "call_function":
                    continue
                inputs: dict = {}
                if n.target in _CONV:
                    inputs = {n.args[0]: activation, n.args[1]: weight}
                elif n.target in _ADD and target != "ort-cpu":
                    inputs = {a: activation for a in n.args[:2] if isinstance(a, torch.fx.Node)}
                output = None
                if target == "ort-cpu" and n.target in _QUANTIZED_OUTPUT:
                    users = list(n.users)
                    fused = n.target in _CONV and len(users) == 1 and users[0].target in _FUSED_AFTER_CONV
                    output = None if fused else activation
                if inputs or output:
                    n.meta["quantization_annotation"] = QuantizationAnnotation(
                        input_qspec_map=inputs, output_qspec=output, _annotated=True)  # fmt: skip
            return model

        def validate(self, model: torch.fx.GraphModule) -> None:
            pass

    return TargetQuantizer()


def prepare(model: nn.Module, target: Target, input_size: int) -> tuple[nn.Module, torch.fx.GraphModule]:
    """(the BN-folded copy of `model`, its PT2E graph with fake quantization, trainable with train.fit).

    Dropout is left out of the graph (it is the identity at inference): torchao's train() would turn every
    dropout into one with p = 0.5 (the literal of its rewrite pattern), whatever the model's p."""
    from torchao.quantization.pt2e import allow_exported_model_train_eval
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    folded = fold_bn.fold_batchnorm(model)[0].cpu()
    example, batch = (torch.randn(2, 3, input_size, input_size),), torch.export.Dim("batch", max=4096)
    try:
        graph = torch.export.export(folded, example, dynamic_shapes=({0: batch},)).module()
    except Exception as err:  # noqa: BLE001 - export failures come in many types
        raise DeployError(f"QAT: torch.export failed ({str(err).splitlines()[0][:200]})") from None
    for n in list(graph.graph.nodes):
        if n.target in _DROPOUT:
            n.replace_all_uses_with(n.args[0])
            graph.graph.erase_node(n)
    graph.recompile()
    prepared = prepare_qat_pt2e(graph, target_quantizer(target))
    return folded, allow_exported_model_train_eval(prepared)


def fake_quantizers(prepared: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The graph's fake-quantize nodes, in graph order."""
    from torchao.quantization.pt2e import FakeQuantize

    return [n for n in prepared.graph.nodes
            if n.op == "call_module" and isinstance(prepared.get_submodule(n.target), FakeQuantize)]  # fmt: skip


def copy_weights(prepared: torch.fx.GraphModule, model: nn.Module) -> None:
    """Load the trained float parameters of the PT2E graph back into `model` (same parameter names)."""
    trained = prepared.state_dict()
    own = model.state_dict()
    missing = [k for k in own if k not in trained]
    if missing:
        raise DeployError(f"QAT: the exported graph has no parameter {missing[0]!r}")
    model.load_state_dict({k: trained[k].detach().to(own[k].device) for k in own})


def qat(model: nn.Module, teacher: nn.Module, dataset, cfg: QATConfig, train: TrainConfig, target: Target,
        input_size: int) -> tuple[nn.Module, list[dict]]:  # fmt: skip
    """Fine-tune `model` for cfg.epochs with fake quantization for `target` and the KD loss toward `teacher`.

    Returns (the BN-folded fine-tuned float model, the training history); `model` itself is left as it was."""
    from ...train import fit, subset
    from ..distill import kd_objective

    loop = train.model_copy(update={"epochs": cfg.epochs, "lr": cfg.lr or train.lr / 10, "batch_size": cfg.batch_size,
                                    "schedule": "cosine"})  # fmt: skip
    folded, prepared = prepare(model, target, input_size)
    loss = kd_objective(copy.deepcopy(teacher), loop, cfg.alpha, cfg.temperature)
    if distributed.is_main():
        info(f"QAT for {target}: {len(fake_quantizers(prepared))} fake-quantize points")
    history = fit(prepared, subset(dataset, cfg.images, loop.seed), loop, loss)
    copy_weights(prepared.cpu(), folded)
    return folded, history


class QAT:
    """Fine-tune with fake quantization and KD from the fp32 model, then quantize the result; keep it only when
    it is no worse on the evaluation images. It fine-tunes the model as exported (not equalized): training adapts
    its weight ranges itself, and its biases were learned under fake quantization, so its int8 model gets no bias
    correction (docs/int8.md has the measurements).

    Under torchrun every process trains, on rank 0's model; only rank 0 quantizes, compares and records the
    result (core/runner.py)."""

    name = "qat"

    def applies(self, b: Build) -> bool:
        q = b.recipe.quantize
        if not q.enabled or q.qat.mode == "off":
            return False
        return q.qat.mode == "on" or (b.options.train is not None and b.model is not None and bool(b.missed()))

    def may_train(self, b: Build) -> bool:
        q = b.recipe.quantize
        return q.enabled and (q.qat.mode == "on" or (q.qat.mode == "auto" and b.options.train is not None))

    def run(self, b: Build) -> str:
        r, q = b.recipe, b.recipe.quantize
        if not distributed.is_main():
            model = distributed.from_main(None)
            qat(model, model, sources.training(b.options.train, r), q.qat, r.train, q.target, r.preprocess.input_size)
            return ""
        if b.model is None:
            raise DeployError("quantize.qat needs a PyTorch model, not an ONNX file")
        if b.options.train is None:
            raise DeployError("quantize.qat: on needs training images: pass --train DIR")
        before, ptq_source = dict(b.evaluate()), b.source
        ptq_keys = ("quantize", "center_activations", "adaround", "bias_correction", "pad_depthwise")
        ptq_report = {k: b.report[k] for k in ptq_keys if k in b.report}
        with tempfile.TemporaryDirectory(dir=b.workdir) as keep:
            kept = {p: Path(keep, p.name) for p in (b.int8_onnx, b.workdir / PREPARED) if p.is_file()}
            for path, copy in kept.items():
                shutil.copy(path, copy)
            images = sources.training(b.options.train, r)
            distributed.from_main(b.model)  # the model the other processes of a torchrun job train alongside
            tuned, history = qat(b.model, b.model, images, q.qat, r.train, q.target, r.preprocess.input_size)
            b.source = b.workdir / PREPARED
            export(tuned, b.source, r.export, r.preprocess.input_size)
            reason = "quantize.qat: on" if q.qat.mode == "on" else \
                "post-training int8 missed: " + "; ".join(missed_thresholds(r.verify, before))  # fmt: skip
            b.report["qat"] = {"mode": q.qat.mode, "history": history, "world_size": distributed.world_size(),
                               "ptq": _figures(before), "reason": reason}  # fmt: skip
            for learned_without_training in ("adaround", "bias_correction"):
                b.report.pop(learned_without_training, None)
            for stage, label in ((PadDepthwise(), "pad_depthwise"), (Quantize(), "quantize_qat")):
                if stage.applies(b):
                    with b.stage(label) as s:
                        s["notes"] = stage.run(b)
            after = b.evaluate()
            b.report["qat"]["int8"] = _figures(after)
            notes = f"{len(history)} epochs on {min(len(images), q.qat.images or len(images))} images"
            if _score(b, after) <= _score(b, before):
                return notes
            (b.workdir / PREPARED).unlink()
            for path, copy in kept.items():
                copy.replace(path)
        b.report.update(ptq_report)
        b.report["qat"]["kept"] = "post-training"
        b.accuracy, b.source = before, ptq_source
        b.warn(f"QAT made int8 worse ({figures(after)}; post-training {figures(before)}): kept the post-training model")
        return notes + ", post-training model kept"


def _score(b: Build, acc: dict) -> tuple:
    """Lower is better: thresholds missed, then disagreement with fp32 (less noisy than the top-1 drop, in
    which flips either way cancel)."""
    return len(missed_thresholds(b.recipe.verify, acc)), -acc["agreement"]


def _figures(acc: dict) -> dict:
    return {k: acc[k] for k in ("top1_drop", "agreement", "sqnr_db") if k in acc}
