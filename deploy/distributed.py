"""Training across processes under torchrun: the process group, DDP, data sharding and the few collectives the
training loop and the build runner need (torch.distributed).

torchrun's environment variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) make a run distributed;
without them every helper here is the identity of a one-process run, and training is what it always was. The
backend follows the training device: NCCL on CUDA, gloo on CPUs. Every collective waits at most
DEPLOY_DIST_TIMEOUT seconds (default 1800): a process that fails or stalls ends the others with a one-line error
naming their rank, not a hang. docs/distributed.md has the whole story.
"""

from __future__ import annotations

import datetime
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import distributed as dist
from torch import nn

from .errors import DeployError

TIMEOUT_ENV = "DEPLOY_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0  # the longest a process waits for the others: rank 0's evaluation or checkpoint included


def active() -> bool:
    """Whether torchrun (or its environment variables) started this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank() -> int:
    """This process's rank, 0 to world_size() - 1 (0 in a one-process run)."""
    return int(os.environ["RANK"]) if active() else 0


def world_size() -> int:
    """How many processes take part (1 in a one-process run)."""
    return int(os.environ["WORLD_SIZE"]) if active() else 1


def local_rank() -> int:
    """This process's index on its node: the GPU it trains on."""
    return int(os.environ.get("LOCAL_RANK", 0)) if active() else 0


def is_main() -> bool:
    """Rank 0: the one process that writes checkpoints, reports and builds."""
    return rank() == 0


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def _timeout_s() -> float:
    value = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise DeployError(f"{TIMEOUT_ENV}={value!r}: expected a number of seconds > 0")
    return seconds


def _who() -> str:
    return f"rank {rank()} of {world_size()}"


def _first_line(err: BaseException) -> str:
    """The message without gloo's source-file prefix ("[.../pair.cc:561] Connection closed by peer ...")."""
    lines = str(err).strip().splitlines()
    return re.sub(r"^\[[^\]]*\]\s*", "", lines[0] if lines else type(err).__name__)[:300]


def _lost(err: BaseException) -> bool:
    """A failed collective: torch's DistError, or gloo's RuntimeError (a timeout, a peer that closed)."""
    return isinstance(err, dist.DistError) or (isinstance(err, RuntimeError) and "gloo" in str(err))


@contextmanager
def session(device: torch.device | None) -> Iterator[None]:
    """The process group around a block, under torchrun: created (NCCL for a CUDA `device`, else gloo) unless one
    exists, destroyed at the end by the session that created it. In that session errors are one line naming the
    rank: a DeployError, and the other processes lost (one failed or was killed) or silent past the timeout.
    Outside torchrun it does nothing."""
    if not active() or _initialized():
        yield
        return
    seconds = _timeout_s()
    cuda = device is not None and device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    try:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=seconds))
    except (RuntimeError, ValueError) as err:  # DistStoreError (nobody came) is a RuntimeError; ValueError: no env
        where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        raise DeployError(f"{_who()}: the other processes did not join at {where} within {seconds:g} s "
                          f"({_first_line(err)})") from None  # fmt: skip
    try:
        yield
    except DeployError as err:
        raise (type(err)(f"{_who()}: {err}") if world_size() > 1 else err) from None
    except RuntimeError as err:
        if not _lost(err):
            raise
        raise DeployError(f"{_who()}: lost the other processes, or they did not answer within {seconds:g} s (one "
                          f"failed, was killed or stalled; {TIMEOUT_ENV} sets the limit): {_first_line(err)}") from None  # fmt: skip
    finally:
        dist.destroy_process_group()


def per_process_batch(batch_size: int) -> int:
    """Each process's share of a global batch; a batch that does not divide evenly is an error."""
    n = world_size()
    if batch_size % n:
        raise DeployError(f"batch size {batch_size} does not divide among the {n} processes of this torchrun job: "
                          f"make it a multiple of {n} (the batch size is the global batch; each process takes "
                          f"1/{n} of it)")  # fmt: skip
    return batch_size // n


def sampler(dataset, seed: int) -> torch.utils.data.DistributedSampler:
    """This process's share of a shuffled epoch: the same permutation (from `seed` and the epoch set with
    set_epoch) on every process, dealt out rank by rank; padded with repeats so every process has as many."""
    return torch.utils.data.DistributedSampler(dataset, num_replicas=world_size(), rank=rank(), shuffle=True, seed=seed)


def shard(dataset):
    """Every world_size()-th item from this rank's (no repeats: counts summed with all_sum are exact)."""
    n = world_size()
    return torch.utils.data.Subset(dataset, range(rank(), len(dataset), n)) if n > 1 else dataset


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` in DistributedDataParallel (rank 0's weights and buffers on every process at the start, gradients
    averaged over the processes at every step), or `model` itself outside a process group."""
    if not _initialized():
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_sum(*values: float) -> list[float]:
    """The sums over the processes of these numbers (the numbers themselves in one process)."""
    if not _initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def all_gather(obj) -> list:
    """Every process's `obj`, in rank order ([obj] in one process)."""
    if not _initialized():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def from_main(obj):
    """Rank 0's `obj` on every process (pickled; rank 0 keeps its own object). The current folder is importable
    while unpickling, as it is for the model.factory code a model may come from (deploy/models.py)."""
    if not _initialized():
        return obj
    box = [obj]
    sys.path.insert(0, os.getcwd())
    try:
        dist.broadcast_object_list(box, src=0, device=_comm_device())
    finally:
        sys.path.remove(os.getcwd())
    return box[0]


def broadcast_buffers(module: nn.Module) -> None:
    """Rank 0's buffers (BN running statistics) on every process. DDP broadcasts them before each training
    forward, so after an epoch's last step each process holds its own: call this before evaluating or saving."""
    if _initialized():
        for buf in module.buffers():
            dist.broadcast(buf, 0)


def barrier() -> None:
    """Wait until every process gets here (bounded by the timeout)."""
    if _initialized():
        dist.barrier()
