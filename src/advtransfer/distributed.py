"""torch.distributed glue: one process per device under ``torchrun`` (gloo on CPU, NCCL on GPU); a no-op otherwise.

Training shards every global batch across ranks and averages gradients with DDP, so N processes take the same steps as
one; evaluation shards the examples and all-gathers the masks. Only rank 0 writes files.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def init() -> None:
    """Join the process group if launched by torchrun (idempotent)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)


def shutdown(ok: bool = True) -> None:
    """Leave the process group (no-op outside torchrun); after success, first wait for every rank."""
    # exiting with a live gloo group can abort the interpreter at teardown (SIGABRT) though the run finished
    if not dist.is_initialized():
        return
    try:
        if ok:
            dist.barrier()
    finally:
        dist.destroy_process_group()


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device:
    if dist.is_initialized() and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def shard_bounds(n: int, r: int | None = None, w: int | None = None) -> tuple[int, int]:
    """Contiguous slice ``[lo, hi)`` of ``n`` items for rank ``r`` of ``w`` (sizes differ by at most one)."""
    r, w = rank() if r is None else r, world() if w is None else w
    base, extra = divmod(n, w)
    lo = r * base + min(r, extra)
    return lo, lo + base + (1 if r < extra else 0)


def gather_cat(t: torch.Tensor, n_total: int) -> torch.Tensor:
    """All-gather per-rank shards made by ``shard_bounds`` back into one tensor of length ``n_total``."""
    if world() == 1:
        return t
    sizes = [hi - lo for lo, hi in (shard_bounds(n_total, r) for r in range(world()))]
    padded = torch.zeros((max(sizes), *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: len(t)] = t
    parts = [torch.empty_like(padded) for _ in range(world())]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def all_sum(values: list[float]) -> list[float]:
    """Sum numbers over ranks (identity in one process)."""
    if world() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device())
    dist.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def ddp(model: torch.nn.Module, log, compile_it: bool = False) -> torch.nn.Module | None:
    """A DistributedDataParallel wrapper of ``model`` under torchrun (None in one process)."""
    if world() == 1:
        return None
    dev = next(model.parameters()).device
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        if dev.type == "cuda":  # statistics over the global batch, as one process computes them
            torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            log("BatchNorm under torchrun on CPU normalises with each rank's shard (SyncBatchNorm is GPU-only)")
    wrapped = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    return torch.compile(wrapped) if compile_it else wrapped
