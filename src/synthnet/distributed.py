"""``torch.distributed`` helpers: gloo on CPU, NCCL on GPU, started by ``torchrun``."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def setup(device: str = "cpu") -> tuple[int, int]:
    """Join the process group when launched by torchrun; return ``(rank, world_size)``."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
