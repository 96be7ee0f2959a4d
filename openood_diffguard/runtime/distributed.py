"""Sample sharding for ``torchrun --nproc_per_node N``: each rank scores its share, everyone gets all rows.

Ownership is decided per sample from a hash of its cache key (not its position), so the split is
deterministic even when loaders shuffle differently on each rank, and a resumed run with another
world size still re-uses every cached row. Rows are exchanged with ``all_gather_object`` (rank 0, and
every other rank, ends up with the full set, so OpenOOD's evaluators run unchanged on all ranks).
"""
from __future__ import annotations

import os
import zlib
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def owned(keys: Sequence[str], rank: int, world: int) -> np.ndarray:
    """Mask of the keys this rank must compute (stable across runs, processes and Python hash seeds)."""
    if world == 1:
        return np.ones(len(keys), dtype=bool)
    return np.fromiter((zlib.crc32(k.encode()) % world == rank for k in keys), dtype=bool, count=len(keys))


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (list of length world); the identity on a single process."""
    rank, world = rank_and_world()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def init_from_env() -> bool:
    """Join the process group torchrun describes in the environment (nccl on GPUs, else gloo).

    Returns True when running distributed. Each rank uses the GPU ``LOCAL_RANK``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return False
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True
