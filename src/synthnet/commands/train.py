"""``synthnet train``: train a generator; ``method=`` picks the module that does it (imitation on the
zoo, the task loss of the generated networks, or GRPO)."""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from synthnet.commands.train_grpo import train_grpo
from synthnet.commands.train_imitation import train_imitation_command
from synthnet.commands.train_task import train_task_command
from synthnet.config import command
from synthnet.errors import SynthNetError

METHODS = {"imitation": train_imitation_command, "task": train_task_command, "grpo": train_grpo}


@command("train", "train a generator (generator=, method=task|imitation|grpo; task = imitation, then the "
                  "generated networks' task loss) into generators/{generator}-{method}.safetensors; resumes")
def train_command(cfg: DictConfig) -> None:
    """Under ``torchrun --nproc_per_node=N`` imitation and the task loss train data parallel
    (:mod:`synthnet.distributed`); rank 0 alone logs and writes."""
    from synthnet import distributed

    if cfg.method.name not in METHODS:
        raise SynthNetError(f"`synthnet train` knows method={', '.join(METHODS)}, not '{cfg.method.name}'")
    rank, world_size = distributed.setup(cfg.device)
    if world_size > 1 and cfg.method.name == "grpo":
        raise SynthNetError("method=grpo runs in one process (its candidates are already scored as one batch); "
                            "run it without torchrun")
    if rank:
        logging.getLogger("synthnet").setLevel(logging.WARNING)  # rank 0 alone logs
    METHODS[cfg.method.name](cfg)
    distributed.teardown()
