"""``torch.distributed`` helpers: gloo on CPU, NCCL on GPU, started by ``torchrun``.

Generator training is data parallel: every rank draws the same global batch from the same seeded stream
(pairs, permutations and noise for imitation; inits and examples for the task loss), computes the loss on
its own share (:func:`shard`: rows ``rank, rank + W, ...``) and the gradients are averaged across ranks
(:func:`average_gradients`) before clipping and the optimizer step. So one step on W ranks equals one
step of a single process on the global batch (the losses are batch means; the Mixture-of-Experts
load-balancing term, a product of two batch means, is computed per rank as in Switch Transformer's
data-parallel training). Rank 0 alone logs, validates, saves and resumes.

Generation and the evaluation's SGD twins split their seeds instead (:func:`share`: seeds ``rank, rank + W,
...``); each rank fills its own entries of a full-size tensor, zeros elsewhere, and :func:`all_sum` gives every
rank the whole (exact: each entry is one rank's value plus zeros).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from synthnet.errors import SynthNetError


def setup(device: str = "cpu") -> tuple[int, int]:
    """Join the process group when launched by torchrun; return ``(rank, world_size)``."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def local_device(device: str) -> torch.device:
    """``device``; under torchrun an accelerator named without an index (``cuda``, ``xpu``, ...) becomes this
    process's own one (``LOCAL_RANK``) when the machine has several of that kind."""
    chosen = torch.device(device)
    backend = getattr(torch, chosen.type, None)  # torch.cuda, torch.xpu, ...: whatever the user named
    several = hasattr(backend, "device_count") and chosen.type != "cpu" and backend.device_count() > 1
    if several and chosen.index is None and "LOCAL_RANK" in os.environ:
        return torch.device(chosen.type, int(os.environ["LOCAL_RANK"]))
    return chosen


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def is_main_process() -> bool:
    return rank() == 0


def check_divisible(count: int, what: str) -> None:
    """Refuse a global batch that the ranks cannot share equally (the averaged gradient would then not be
    the global batch's)."""
    if count % world_size():
        raise SynthNetError(f"{what}={count} cannot be shared by {world_size()} processes; use a multiple of "
                            f"{world_size()}")


def shard(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a global batch (dim 0): ``rank, rank + W, ...``; the whole tensor without torchrun."""
    return tensor[rank()::world_size()] if active() else tensor


def share(items):
    """This rank's items of a sequence: ``rank, rank + W, ...``; all of them without torchrun."""
    return items[rank()::world_size()] if active() else items


def check_enough(count: int, what: str) -> None:
    """Refuse fewer items than processes (a rank with nothing to do)."""
    if count < world_size():
        raise SynthNetError(f"{what}={count} is fewer than the {world_size()} processes; use at least {world_size()}")


def _collective_device() -> torch.device:
    """Where the backend reduces: this process's GPU for NCCL, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over the ranks, in place (itself without torchrun)."""
    if active():
        work = tensor.to(_collective_device())
        dist.all_reduce(work)
        tensor.copy_(work)
    return tensor


def all_max(value: float) -> float:
    """The largest ``value`` over the ranks."""
    if not active():
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor)


def average_gradients(model: torch.nn.Module) -> None:
    """Replace every gradient by its mean over the ranks (one flat all-reduce; a missing gradient counts as
    zeros, so every rank takes part with the same shapes)."""
    if not active():
        return
    parameters = [p for p in model.parameters() if p.requires_grad]
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in parameters])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for p in parameters:
        p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
        offset += p.numel()


def mean(value: float, device: torch.device | str = "cpu") -> float:
    """The mean of a scalar over the ranks (for logging the global batch's loss)."""
    if not active():
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor) / world_size()


def broadcast_float(value: float, device: torch.device | str = "cpu") -> float:
    """Rank 0's ``value`` on every rank (e.g. a validation score that decides early stopping)."""
    if not active():
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.broadcast(tensor, 0)
    return float(tensor)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
