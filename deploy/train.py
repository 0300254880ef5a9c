"""The training loop (`deploy train`, and the distill stage): ImageFolder data, SGD/AdamW with a cosine or
one-cycle schedule, label smoothing, a seed, a checkpoint every epoch and `--resume`; in one process, or in
several under torchrun (DDP, deploy/distributed.py)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from . import distributed
from .console import info, track
from .errors import DeployError
from .recipe import Augment, Preprocess, TrainConfig

Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, images, labels) -> loss


@contextmanager
def torch_threads(n: int):
    """torch on `n` OpenMP threads for a while (small ops on 2 threads of a shared 2-core machine wait on each
    other: see the callers' measurements)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def train_transform(pre: Preprocess, augment: Augment):
    """Training augmentation at the recipe's input size, normalized like evaluation."""
    from torchvision.transforms import InterpolationMode, v2

    size, interp = pre.input_size, InterpolationMode(pre.interpolation)
    steps = {
        "none": [v2.Resize(pre.resize, interp, antialias=True), v2.CenterCrop(size)],
        "flip": [v2.Resize(pre.resize, interp, antialias=True), v2.CenterCrop(size), v2.RandomHorizontalFlip()],
        "crop_flip": [v2.Resize(size, interp, antialias=True), v2.CenterCrop(size),
                      v2.RandomCrop(size, padding=size // 8, padding_mode="reflect"), v2.RandomHorizontalFlip()],
        "random_resized_crop": [v2.RandomResizedCrop(size, (0.25, 1.0), interpolation=interp, antialias=True),
                                v2.RandomHorizontalFlip()],
    }[augment]  # fmt: skip
    return v2.Compose([*steps, v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(pre.mean, pre.std)])


def eval_transform(pre: Preprocess):
    """The evaluation preprocessing of deploy.data as a torchvision transform (tensor output)."""
    from torchvision.transforms import v2

    return v2.Compose([v2.Resize(pre.resize, v2.InterpolationMode(pre.interpolation), antialias=True),
                       v2.CenterCrop(pre.input_size), v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(pre.mean, pre.std)])  # fmt: skip


def image_folder(root: Path, transform, num_classes: int | None, what: str):
    """A torchvision ImageFolder (one subfolder per class, sorted order = class index).

    With num_classes=None a folder without class subfolders is read as unlabeled images (label -1)."""
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader

    if not Path(root).is_dir():
        raise DeployError(f"{what} directory not found: {root}")
    classes = sorted(d.name for d in Path(root).iterdir() if d.is_dir())
    if classes and (num_classes is None or len(classes) == num_classes):
        return ImageFolder(str(root), transform)
    if num_classes is not None:
        raise DeployError(f"{what} directory {root} has {len(classes)} class folders but the model has {num_classes} classes")
    files = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in IMG_EXTENSIONS)
    if not files:
        raise DeployError(f"{what} directory {root} holds no images")
    return _Unlabeled(files, transform, default_loader)


class _Unlabeled(torch.utils.data.Dataset):
    def __init__(self, files, transform, loader):
        self.files, self.transform, self.loader = files, transform, loader

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i):
        return self.transform(self.loader(str(self.files[i]))), -1


def subset(dataset, n: int | None, seed: int):
    """`n` items of `dataset` drawn with `seed` (all of them when n is None or larger)."""
    if n is None or n >= len(dataset):
        return dataset
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n]
    return torch.utils.data.Subset(dataset, idx.tolist())


def device_for(cfg: TrainConfig) -> torch.device:
    """The training device; under torchrun a process's GPU is the one of its LOCAL_RANK."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise DeployError("train.device is cuda but CUDA is not available")
    if cfg.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", distributed.local_rank()) if distributed.active() else torch.device("cuda")


def _progress(items, description: str, total: int):
    """A progress bar on rank 0 only: one per terminal, not one per process."""
    return track(items, description, total=total) if distributed.is_main() else items


def _optimizer_and_schedule(model: nn.Module, cfg: TrainConfig, steps_per_epoch: int):
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() <= 1]  # BN and biases
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True)
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.lr)
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle" and total >= 4:  # OneCycleLR divides by zero on shorter runs
        warmup = min(0.5, max(0.25, 2 / total))
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=warmup)
    else:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    return opt, sched


def _save_atomic(obj: dict, path: Path) -> None:
    """torch.save to a temporary file renamed into place: an interrupted save never leaves a broken file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    tmp.replace(path)


def state_path(out: Path) -> Path:
    """Where the resumable training state (optimizer, schedule, RNG) lives next to the weights."""
    return out.with_name(out.name + ".train-state")


def evaluate(model: nn.Module, dataset, batch_size: int = 256, device: torch.device | None = None) -> float:
    """Top-1 accuracy in percent on a labeled dataset."""
    correct, total = _correct(model, dataset, batch_size, device)
    return 100.0 * correct / total


@torch.no_grad()
def _correct(model: nn.Module, dataset, batch_size: int = 256, device: torch.device | None = None) -> tuple[int, int]:
    """(correct top-1 predictions, images) on a labeled dataset."""
    device = device or next(model.parameters()).device
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=0)
    correct = total = 0
    for x, y in _progress(loader, "Evaluating", len(loader)):
        correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
        total += len(y)
    return correct, total


def _loader(dataset, cfg: TrainConfig) -> torch.utils.data.DataLoader:
    """One process: shuffled batches of cfg.batch_size. Under torchrun: this process's share of the same global
    batches, batch_size / world_size images each, from a DistributedSampler seeded with cfg.seed."""
    if not distributed.active():
        return torch.utils.data.DataLoader(
            dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=len(dataset) > cfg.batch_size,
            num_workers=cfg.workers, generator=torch.Generator().manual_seed(cfg.seed),
            persistent_workers=cfg.workers > 0,
        )  # fmt: skip
    batch, sampler = distributed.per_process_batch(cfg.batch_size), distributed.sampler(dataset, cfg.seed)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch, sampler=sampler, drop_last=len(sampler) > batch, num_workers=cfg.workers,
        generator=torch.Generator().manual_seed(cfg.seed + distributed.rank()), persistent_workers=cfg.workers > 0,
    )  # fmt: skip


def _resume_state(out: Path | None, device: torch.device) -> dict:
    """The state saved next to `out`, checked to come from a run of as many processes as this one."""
    if out is None or not state_path(out).is_file():
        raise DeployError(f"nothing to resume: {state_path(out) if out else 'no --out'} not found")
    try:  # tensors, numbers and dicts only: a planted pickle must not run (weights_only)
        st = torch.load(state_path(out), map_location=device, weights_only=True)
    except Exception as err:  # noqa: BLE001 - corrupt files and refused pickles raise many types
        raise DeployError(f"cannot resume from {state_path(out)}: {str(err).splitlines()[0][:200]}") from None
    saved, now = st.get("world_size", 1), distributed.world_size()
    if saved != now:
        raise DeployError(f"cannot resume {state_path(out)} with {now} process(es): it was saved by a run of "
                          f"{saved}; resume with as many (torchrun --nproc-per-node), or start over with --force")  # fmt: skip
    return st


def fit(model: nn.Module, dataset, cfg: TrainConfig, loss_fn: Loss, *, val=None, out: Path | None = None,
        resume: bool = False, meta: dict | None = None) -> list[dict]:  # fmt: skip
    """Train `model` in place for cfg.epochs; returns one record per epoch (loss, accuracy, val top-1, seconds,
    world_size).

    After every epoch the weights (with `meta`) go to `out` and the resumable state next to it, both written
    atomically, so Ctrl-C leaves the last epoch's checkpoint valid.

    Under torchrun every process calls fit: each trains on its share of every global batch of cfg.batch_size
    (DDP averages the gradients, so the steps are those of one process on the whole batch), the records are
    over all processes, and rank 0 alone writes `out` (with every process's random state, for --resume).
    BatchNorm normalizes each process's share by its own statistics (no SyncBatchNorm: PyTorch's runs on GPUs
    only, and shares of 32+ images estimate them well); the running statistics kept are rank 0's."""
    device = device_for(cfg)
    batches = _loader(dataset, cfg)  # before the process group: a batch that does not divide is an error at once
    with distributed.session(device):
        ws = distributed.world_size()
        # each process its own augmentation and dropout draws; rank 0's are those of a one-process run
        torch.manual_seed(cfg.seed + distributed.rank())
        # channels_last: measured 2-3x faster training steps for depthwise-separable nets on x86 CPUs (oneDNN)
        model.to(device, memory_format=torch.channels_last)
        opt, sched = _optimizer_and_schedule(model, cfg, len(batches))
        history: list[dict] = []
        start_epoch = 0
        if resume:
            st = _resume_state(out, device)
            model.load_state_dict(st["model"])
            opt.load_state_dict(st["optimizer"])
            sched.load_state_dict(st["scheduler"])
            rng, loader_rng = st["rank_rng"][distributed.rank()] if ws > 1 else (st["rng"], st["loader_rng"])
            torch.set_rng_state(rng)
            batches.generator.set_state(loader_rng)
            start_epoch, history = st["epoch"], st["history"]
            if distributed.is_main():
                info(f"resuming after epoch {start_epoch}/{cfg.epochs}")
        net = distributed.wrap(model, device)
        for epoch in range(start_epoch, cfg.epochs):
            if isinstance(batches.sampler, torch.utils.data.DistributedSampler):
                batches.sampler.set_epoch(epoch)
            model.train()
            t0 = time.perf_counter()
            loss_sum = n = correct = labeled = 0
            for x, y in _progress(batches, f"epoch {epoch + 1}/{cfg.epochs}", len(batches)):
                x = x.to(device, memory_format=torch.channels_last, non_blocking=True)
                y = y.to(device, non_blocking=True)
                logits = net(x)
                loss = loss_fn(logits, x, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                loss_sum += loss.item() * len(x)
                n += len(x)
                mask = y >= 0
                correct += (logits.argmax(1)[mask] == y[mask]).sum().item()
                labeled += mask.sum().item()
            loss_sum, n, correct, labeled = distributed.all_sum(loss_sum, n, correct, labeled)
            distributed.broadcast_buffers(model)  # evaluate and save rank 0's BN statistics
            rec = {"epoch": epoch + 1, "loss": loss_sum / n, "seconds": round(time.perf_counter() - t0, 1),
                   "world_size": ws}  # fmt: skip
            if labeled:
                rec["train_top1"] = 100.0 * correct / labeled
            if val is not None:
                right, total = distributed.all_sum(*_correct(model, distributed.shard(val), device=device))
                rec["val_top1"] = 100.0 * right / total
            history.append(rec)
            if distributed.is_main():
                info(f"epoch {epoch + 1}/{cfg.epochs}: loss {rec['loss']:.4f}"
                     + (f", train top-1 {rec['train_top1']:.2f}%" if labeled else "")
                     + (f", val top-1 {rec['val_top1']:.2f}%" if val is not None else "")
                     + f" ({rec['seconds']:.0f} s" + (f", {ws} processes" if ws > 1 else "") + ")")  # fmt: skip
            if out is not None:
                _checkpoint(model, opt, sched, batches, epoch + 1, history, meta, out)
        if out is not None:
            distributed.barrier()  # fit returns on every process once rank 0 has written `out`
    model.to(memory_format=torch.contiguous_format).eval()
    return history


def _checkpoint(model, opt, sched, batches, epoch: int, history: list[dict], meta: dict | None, out: Path) -> None:
    """Rank 0 writes the weights (with `meta`) to `out` and the resumable state next to it."""
    ws = distributed.world_size()
    rngs = distributed.all_gather((torch.get_rng_state(), batches.generator.get_state()))
    if not distributed.is_main():
        return
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _save_atomic({"state_dict": weights, "epoch": epoch, "history": history, "world_size": ws, **(meta or {})}, out)
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "rng": rngs[0][0], "loader_rng": rngs[0][1], "epoch": epoch, "history": history, "world_size": ws}  # fmt: skip
    if ws > 1:
        state["rank_rng"] = rngs
    _save_atomic(state, state_path(out))
