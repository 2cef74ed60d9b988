"""``synthnet zoo``: build the checkpoint zoo."""

from __future__ import annotations

import dataclasses
import logging
import time

from omegaconf import DictConfig

from synthnet.budget import check_files_on_disk
from synthnet.config import command, container

log = logging.getLogger("synthnet")


@command("zoo", "train R runs of the target on the task and save every checkpoint (zoo.runs, zoo.epochs)")
def zoo_command(cfg: DictConfig) -> None:
    import torch

    from synthnet import distributed
    from synthnet.tasks import build_task
    from synthnet.targets import build_target
    from synthnet.zoo import ZooSpec, build_zoo, default_group_size, format_summary, summarize
    from synthnet.zoo.training import Recipe, steps_per_epoch

    runs, first_seed = int(cfg.zoo.runs), int(cfg.zoo.first_seed)
    recipe = Recipe(**{f.name: cfg.zoo[f.name] for f in dataclasses.fields(Recipe)})
    task = build_task(container(cfg.task), cfg.paths.data_dir)
    model = build_target(container(cfg.target), task.input_shape, task.num_classes).to(torch.device(cfg.device))
    spec = ZooSpec(container(cfg.target), container(cfg.task), recipe,
                   tuple(int(w) for w in cfg.zoo.family_widths), tuple(int(d) for d in cfg.zoo.family_depths))
    seeds = list(range(first_seed, first_seed + runs))
    largest = sum(p.numel() for p in model.parameters())
    if spec.is_family:  # every member the seeds pick is checked (a target without families is refused) and sized
        with torch.device("meta"):
            members = {repr(sorted(spec.run_target(s).items())): spec.run_target(s) for s in seeds}
            largest = max(sum(p.numel() for p in build_target(c, task.input_shape, task.num_classes).parameters())
                          for c in members.values())
    per_run = steps_per_epoch(task, recipe) * recipe.epochs // (recipe.checkpoint_every or steps_per_epoch(task, recipe)) + 2
    check_files_on_disk(cfg, f"zoo.runs={runs} ({per_run} checkpoints a run)", runs * per_run, largest,
                        cfg.paths.checkpoints_dir)
    rank, world_size = distributed.setup(cfg.device)
    start = time.perf_counter()
    if rank == 0:
        log.info("%s; zoo of %d runs%s -> %s", task.summary(), runs,
                 f" over {len(members)} architectures of a family" if spec.is_family else "", cfg.paths.checkpoints_dir)
    result = build_zoo(model=model, spec=spec, task=task, seeds=seeds, checkpoints_dir=cfg.paths.checkpoints_dir,
                       group_size=cfg.zoo.group_size or default_group_size(model), rank=rank, world_size=world_size,
                       progress=cfg.progress and rank == 0)
    distributed.barrier()
    if rank == 0:
        if result["skipped"]:
            log.info("skipped %d completed runs", len(result["skipped"]))
        summary = summarize(cfg.paths.checkpoints_dir, seeds, cfg.zoo.epochs * steps_per_epoch(task, recipe))
        print(f"zoo: {cfg.target.name} on {cfg.task.name} ({cfg.paths.checkpoints_dir})")
        print(format_summary(summary, time.perf_counter() - start))
    distributed.teardown()
