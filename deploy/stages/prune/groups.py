"""What the pruning modes share: the layers never pruned, Torch-Pruning's importance criteria, adaptive BN, and
the widths a pruned checkpoint records.

Torch-Pruning (1.6) couples depthwise convs, residual adds, squeeze-excite gates and concatenations
correctly on the compact families. Two gaps are handled here:
- it protects heads by layer type only: a conv classifier (SqueezeNet) lost its class outputs. The head is
  found by role instead: every Conv/Linear that reaches the model output through parameter-free ops.
- it cannot follow ShuffleNetV2's channel_shuffle (a view/transpose in plain Python, so the channel order
  crosses branches) and fails with ZeroDivisionError; VainF/Torch-Pruning#45 suggests ignoring those layers.
  We protect every conv whose output crosses a shuffle, so only the branch-internal widths are pruned, and
  build the graph with the shuffle replaced by identity (sound: no pruned group reaches a shuffle).
- ShuffleNet v1 shuffles inside each unit, between two 1x1 group convs, and its trunk is concatenated across
  group-conv chunks that its parts do not align with. The trunk (stem and every unit's last conv) is protected;
  the bottleneck is one group to Torch-Pruning with the shuffle as identity, which chooses its width (a whole
  number of channels per group), and `exact_shuffle_units` then refills each narrowed unit with the channels
  that the shuffle keeps in their chunks (shufflenet_v1.narrow_into). Harmonic dense blocks (HarDNet) need
  nothing: Torch-Pruning maps each layer's channels into every concatenation that reads it.
"""

from __future__ import annotations

import copy
import fnmatch
from contextlib import contextmanager

import torch
from torch import fx, nn

from ...errors import DeployError
from ...recipe import PruneConfig

_PARAM_LAYERS = (nn.Conv2d, nn.Linear)


def head_layers(model: nn.Module) -> list[str]:
    """Names of the Conv/Linear layers whose outputs reach the model output through parameter-free ops."""
    graph = fx.Tracer().trace(model)
    modules = dict(model.named_modules())
    heads, seen = [], set()
    stack = [n for n in graph.nodes if n.op == "output"]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_module" and isinstance(modules[node.target], _PARAM_LAYERS):
            heads.append(node.target)
            continue
        if node.op == "call_module" and any(True for _ in modules[node.target].parameters()):
            continue  # a norm layer after the head would carry the head's channels; not in supported models
        stack.extend(n for n in node.all_input_nodes)
    return sorted(heads)


def _stem(model: nn.Module) -> str | None:
    return next((n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)


def _shuffle_crossing(model: nn.Module) -> list[str]:
    """ShuffleNetV2: convs whose outputs are concatenated and shuffled across blocks (see module docstring)."""
    from torchvision.models.shufflenetv2 import InvertedResidual

    names = []
    for name, m in model.named_modules():
        if isinstance(m, InvertedResidual):
            for branch in ("branch1", "branch2"):
                convs = [f"{name}.{branch}.{n}" for n, c in getattr(m, branch).named_modules() if isinstance(c, nn.Conv2d)]
                names += convs[-1:] if branch == "branch2" else convs  # branch1 is dw + 1x1, both at block width
    return names


@contextmanager
def traceable_shuffle():
    """ShuffleNetV2's channel_shuffle as identity while Torch-Pruning traces (see module docstring)."""
    from torchvision.models import shufflenetv2

    original = shufflenetv2.channel_shuffle
    shufflenetv2.channel_shuffle = lambda x, groups: x
    try:
        yield
    finally:
        shufflenetv2.channel_shuffle = original


def _shuffle_v1_protected(model: nn.Module, round_to: int) -> list[str]:
    """ShuffleNet v1: the stem and every unit's last conv, whose outputs form the trunk (see module docstring), and
    the bottlenecks Torch-Pruning cannot round: it rounds a group conv's whole width to round_to but removes that
    many channels from each of its g groups, which keeps the kept width a multiple of round_to only where
    g · (g - 1) · (channels per group) is one (not so for 0.5x g = 3's 10 a group: it kept 12 of 30)."""
    from ...shufflenet_v1 import ShuffleUnit

    units = [(name, m) for name, m in model.named_modules() if isinstance(m, ShuffleUnit)]
    trunk = [f"{name}.gconv2.0" for name, _ in units]
    unroundable = [f"{name}.gconv1.0" for name, m in units
                   if m.groups * (m.groups - 1) * (m.gconv1[0].out_channels // m.groups) % round_to]  # fmt: skip
    return trunk + unroundable + [_stem(model)] if units else []


@torch.no_grad()
def exact_shuffle_units(original: nn.Module, pruned: nn.Module, kind: str) -> int:
    """Refill every ShuffleNet v1 unit that pruning narrowed with the channels the shuffle keeps in their chunks
    (see module docstring); returns the number of units."""
    from ...shufflenet_v1 import ShuffleUnit, narrow_into

    narrowed = dict(pruned.named_modules())
    units = [(n, m) for n, m in original.named_modules() if isinstance(m, ShuffleUnit)
             and narrowed[n].gconv1[0].out_channels < m.gconv1[0].out_channels]  # fmt: skip
    for name, unit in units:
        try:
            narrow_into(unit, narrowed[name], kind)
        except ValueError as err:
            raise DeployError(f"ShuffleNet v1 {name}: {err}; try another prune.round_to (8 works)") from None
    return len(units)


def protected_layers(model: nn.Module, cfg: PruneConfig) -> list[str]:
    names = set(head_layers(model)) | set(_shuffle_crossing(model)) | set(_shuffle_v1_protected(model, cfg.round_to))
    if cfg.protect_stem and (stem := _stem(model)):
        names.add(stem)
    for name, m in model.named_modules():
        if isinstance(m, _PARAM_LAYERS) and any(fnmatch.fnmatchcase(name, g) for g in cfg.protect):
            names.add(name)
    return sorted(names)


def importance(kind: str):
    import torch_pruning as tp

    return {
        "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
        "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
        "bn_scale": lambda: tp.importance.BNScaleImportance(),
        "taylor": lambda: tp.importance.GroupTaylorImportance(),
    }[kind]()


@torch.no_grad()
def adapt_bn(model: nn.Module, batches) -> int:
    """Re-estimate every BatchNorm's running statistics on `batches` of images (adaptive BN, EagleEye, Li et
    al. 2020); returns the number of images used. Pruning changes the inputs of the layers after it, so their
    stored statistics are stale; torchvision's MobileNetV3 updates them with momentum 0.01, too slowly for a
    few epochs of fine-tuning to fix."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    was_training = model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
    model.train()
    device = next(model.parameters()).device
    n = 0
    for x in batches:
        model(torch.as_tensor(x).to(device))
        n += len(x)
    for m, momentum in zip(bns, saved):
        m.momentum = momentum
    model.train(was_training)
    return n


def widths(model: nn.Module) -> dict[str, dict[str, int]]:
    """The constructor sizes of every Conv/Linear/BatchNorm layer: what a checkpoint needs to rebuild the model."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            out[name] = {"in_channels": m.in_channels, "out_channels": m.out_channels, "groups": m.groups}
        elif isinstance(m, nn.Linear):
            out[name] = {"in_features": m.in_features, "out_features": m.out_features}
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            out[name] = {"num_features": m.num_features}
    return out


def apply_widths(model: nn.Module, recorded: dict[str, dict[str, int]]) -> nn.Module:
    """Resize the layers of a freshly built `model` to `recorded` widths (weights are loaded afterwards)."""
    modules = dict(model.named_modules())
    for name, size in recorded.items():
        m = modules.get(name)
        if m is None:
            raise DeployError(f"checkpoint records widths for layer {name}, which the model does not have")
        if isinstance(m, nn.Conv2d):
            new = nn.Conv2d(size["in_channels"], size["out_channels"], m.kernel_size, m.stride, m.padding,
                            m.dilation, size["groups"], m.bias is not None, m.padding_mode)  # fmt: skip
        elif isinstance(m, nn.Linear):
            new = nn.Linear(size["in_features"], size["out_features"], m.bias is not None)
        else:
            new = copy.deepcopy(m)
            new.num_features = size["num_features"]
            for attr in ("weight", "bias", "running_mean", "running_var"):
                t = getattr(m, attr, None)
                if t is not None:
                    fresh = torch.zeros(size["num_features"], dtype=t.dtype)
                    if isinstance(t, nn.Parameter):
                        setattr(new, attr, nn.Parameter(fresh))
                    else:
                        new.register_buffer(attr, fresh)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return model


def pruned_checkpoint(model: nn.Module) -> dict:
    """What to torch.save for a pruned model: its weights and the widths that rebuild it."""
    return {"state_dict": model.state_dict(), "deploy_widths": widths(model)}
