"""``synthnet generate``: new networks from fresh random inits with a trained generator."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from synthnet.budget import check_files_on_disk, check_networks_in_memory
from synthnet.commands.artifacts import generator_path
from synthnet.config import command, container

log = logging.getLogger("synthnet")


@command("generate", "write generate.count networks made in generate.steps steps from fresh inits "
                     "(generate.generator=PATH; default generators/{generator}-{method}.safetensors)")
def generate_command(cfg: DictConfig) -> None:
    """Under ``torchrun --nproc_per_node=N`` each process generates and writes its share of the seeds
    (``rank, rank + N, ...``); rank 0 gathers the accuracies and prints the table. Deterministic generation
    (the default) writes the same files as one process; with ``generate.noise_scale > 0`` rank r draws its
    noise from ``seed + r``."""
    from synthnet import distributed

    rank, _ = distributed.setup(cfg.device)
    if rank:
        logging.getLogger("synthnet").setLevel(logging.WARNING)  # rank 0 alone logs
    _generate(cfg)
    distributed.barrier()
    distributed.teardown()


def _generate(cfg: DictConfig) -> None:
    import numpy as np
    import torch

    from synthnet import __version__, distributed
    from synthnet.evaluation.scoring import accuracy_and_loss
    from synthnet.generation import check_layout, generate_networks, target_layout
    from synthnet.generators import check_generator_matches, load_generator
    from synthnet.methods.rewards import compress
    from synthnet.storage import read_metadata, save_state_dict
    from synthnet.targets import architecture_tag
    from synthnet.tasks import build_task
    from synthnet.zoo import list_runs

    count = int(cfg.generate.count)
    steps = int(cfg.generate.steps)
    noise_scale = float(cfg.generate.noise_scale)
    target_config, task_config = container(cfg.target), container(cfg.task)
    device = distributed.local_device(cfg.device)
    distributed.check_enough(count, "generate.count")
    path = generator_path(cfg, cfg.generate.generator)
    loaded = load_generator(path, device)
    unseen = check_generator_matches(path, loaded, target_config, task_config)
    task = build_task(task_config, cfg.paths.data_dir)
    template, layout = target_layout(target_config, task.input_shape, task.num_classes, loaded.chunk_size,
                                        loaded.bias_chunk)
    check_layout(layout, loaded.metadata.get("num_values"), str(path))
    parameters = sum(p.numel() for p in template.parameters())
    check_networks_in_memory(cfg, f"generate.count={count} x generate.steps={steps}", count * (steps + 1), parameters)
    check_files_on_disk(cfg, f"generate.count={count}", count, parameters, cfg.paths.generated_dir)
    first = int(cfg.generate.first_seed)
    if first < int(cfg.zoo.first_seed) + int(cfg.zoo.runs):
        log.warning("generate.first_seed %d overlaps the zoo's seeds; the inits are not new", first)
    all_seeds = list(range(first, first + count))
    seeds = distributed.share(all_seeds)  # this process's share (all of them in one process)
    rng = torch.Generator(device=device).manual_seed(int(cfg.seed) + distributed.rank()) if noise_scale > 0 else None
    out = generate_networks(loaded.model, layout, target_config, task.input_shape, task.num_classes, seeds, steps,
                            noise_scale=noise_scale, rng=rng, device=device)
    x_test, y_test = task.x_test.to(device), task.y_test.to(device)
    template = template.to(device)
    final = compress(out.state_dicts[-1], cfg.generate.prune, cfg.generate.bits, [s.weight for s in
                                                                                  template.layer_specs()])
    compressed = final is not out.state_dicts[-1]
    written = [*out.state_dicts, final] if compressed else out.state_dicts
    mine = torch.stack([accuracy_and_loss(template, {k: v.to(device) for k, v in sd.items()}, x_test, y_test)[0]
                        .cpu().double() for sd in written])  # (steps + 1 [+ 1], len(seeds))
    gathered = torch.zeros(len(written), count, dtype=torch.float64)
    gathered[:, distributed.rank()::distributed.world_size()] = mine
    accuracies = list(distributed.all_sum(gathered))  # every seed's, in seed order
    position = {seed: i for i, seed in enumerate(all_seeds)}
    seconds = distributed.all_max(out.seconds)

    folder = Path(cfg.paths.generated_dir) / path.name.removesuffix(".safetensors")
    if unseen:  # networks of an architecture the generator was not trained on live apart from its own
        folder = folder / architecture_tag(target_config)
    weights = [s.weight for s in template.layer_specs()]
    zeros = sum((final[w] == 0).flatten(1).sum(1) for w in weights) / sum(final[w][0].numel() for w in weights)
    for i, seed in enumerate(seeds):
        metadata = {"generator_file": str(path), "generator": loaded.config["name"], "seed": seed, "steps": steps,
                    "noise_scale": noise_scale, "target": target_config["name"], "target_config": target_config,
                    "task": task_config["name"], "task_config": task_config,
                    "test_accuracy": float(accuracies[-1][position[seed]]), "synthnet_version": __version__,
                    "prune": cfg.generate.prune, "bits": cfg.generate.bits, "weight_sparsity": round(float(zeros[i]), 6)}
        save_state_dict(folder / f"seed_{seed:07d}.safetensors", {k: v[i] for k, v in final.items()}, metadata)

    if not distributed.is_main_process():
        return
    sgd = "n/a"
    runs = list_runs(cfg.paths.checkpoints_dir)
    if runs:
        headers = [read_metadata(files[-1]) for files in runs.values()]  # a family zoo: this architecture's runs
        finals = [m.get("test_accuracy") for m in headers if m.get("target_config", target_config) == target_config]
        finals = [f for f in finals if f is not None]
        if finals:
            sgd = f"{np.mean(finals):.4f} (mean of {len(finals)} zoo runs)"
    print(f"generate: {count} networks in {steps} steps with {path.name} ({seconds:.2f} s{f' on the slowest of {distributed.world_size()} processes' if distributed.active() else ''}) -> {folder}"
          f"{' (zero-shot: an architecture it was not trained on)' if unseen else ''}")
    print("| step | t    | test acc mean | min    | max    | zoo SGD test acc |")
    for k, acc in enumerate(accuracies[:steps + 1]):
        print(f"| {k:4d} | {float(out.result.times[k]):.2f} | {float(acc.mean()):13.4f} | {float(acc.min()):.4f} "
              f"| {float(acc.max()):.4f} | {sgd if k == steps else ''} |")
    if compressed:
        acc = accuracies[-1]
        print(f"written networks ({f'{cfg.generate.prune:g} of weights zeroed' if cfg.generate.prune else 'dense'}, "
              f"{f'{cfg.generate.bits}-bit' if cfg.generate.bits else 'float32'}): test acc mean {float(acc.mean()):.4f}"
              f"  min {float(acc.min()):.4f}  max {float(acc.max()):.4f}")
