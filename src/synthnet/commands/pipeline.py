"""``synthnet pipeline``: the main job, every stage in order with the same overrides."""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from synthnet.config import COMMANDS, command
from synthnet.errors import SynthNetError

log = logging.getLogger("synthnet")


@command("pipeline", "the main job: run the commands in pipeline.stages in order (default: zoo, train, generate, evaluate)")
def pipeline_command(cfg: DictConfig) -> None:
    stages = list(cfg.pipeline.stages)
    unknown = [s for s in stages if s not in COMMANDS or s == "pipeline"]
    if unknown:
        raise SynthNetError(f"unknown pipeline stage '{unknown[0]}'; available: "
                            f"{', '.join(n for n in COMMANDS if n not in ('pipeline', 'config'))}")
    for stage in stages:
        log.info("pipeline stage: %s", stage)
        print(f"\n== synthnet {stage} ==")
        COMMANDS[stage][0](cfg)
