"""``synthnet train``: train a generator; ``method=`` picks the module that does it (imitation on the
zoo, the task loss of the generated networks, or GRPO)."""

from __future__ import annotations

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
    if cfg.method.name not in METHODS:
        raise SynthNetError(f"`synthnet train` knows method={', '.join(METHODS)}, not '{cfg.method.name}'")
    METHODS[cfg.method.name](cfg)
