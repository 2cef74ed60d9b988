"""``synthnet zoo``: build the checkpoint zoo."""

from __future__ import annotations

import logging
import time

from omegaconf import DictConfig

from synthnet.cli import command, container, positive_int

log = logging.getLogger("synthnet")


@command("zoo", "train R runs of the target on the task and save every checkpoint (zoo.runs, zoo.epochs)")
def zoo_command(cfg: DictConfig) -> None:
    import torch

    from synthnet import distributed
    from synthnet.tasks import build_task
    from synthnet.targets import build_target
    from synthnet.zoo import ZooSpec, build_zoo, default_group_size, format_summary, summarize
    from synthnet.zoo.training import Recipe, steps_per_epoch

    runs = positive_int(cfg, "zoo.runs")
    positive_int(cfg, "zoo.epochs")
    if cfg.zoo.group_size is not None:
        positive_int(cfg, "zoo.group_size")
    recipe = Recipe(epochs=cfg.zoo.epochs, batch_size=cfg.zoo.batch_size, optimizer=cfg.zoo.optimizer,
                    lr=float(cfg.zoo.lr), momentum=float(cfg.zoo.momentum), weight_decay=float(cfg.zoo.weight_decay),
                    checkpoint_every=cfg.zoo.checkpoint_every)
    task = build_task(container(cfg.task), cfg.paths.data_dir)
    model = build_target(container(cfg.target), task.input_shape, task.num_classes).to(torch.device(cfg.device))
    spec = ZooSpec(container(cfg.target), container(cfg.task), recipe)
    seeds = list(range(cfg.zoo.first_seed, cfg.zoo.first_seed + runs))
    rank, world_size = distributed.setup(cfg.device)
    start = time.perf_counter()
    if rank == 0:
        log.info("%s; zoo of %d runs -> %s", task.summary(), runs, cfg.paths.checkpoints_dir)
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
