"""``synthnet evaluate``: generated networks beside SGD twins, the zoo and trivial baselines."""

from __future__ import annotations

import logging
import platform
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from synthnet.budget import check_networks_in_memory
from synthnet.config import command, container
from synthnet.errors import SynthNetError

log = logging.getLogger("synthnet")


def generator_files(cfg: DictConfig) -> list[Path]:
    """``evaluate.generators`` if given (``[]`` = none), else every generator file in ``paths.generators_dir``."""
    listed = OmegaConf.select(cfg, "evaluate.generators")
    if listed is not None:
        paths = [Path(p) for p in listed]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise SynthNetError(f"no generator file {missing[0]}; list files that exist in evaluate.generators")
        return paths
    folder = Path(cfg.paths.generators_dir)
    paths = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not paths:
        raise SynthNetError(f"no generator files (*.safetensors) in {folder}; train one with `synthnet train "
                            f"target={cfg.target.name} task={cfg.task.name}`, or pass evaluate.generators=[] "
                            f"to evaluate twins and baselines only")
    return paths


def reproduce_command(cfg: DictConfig, count: int, steps: int) -> str:
    """The command line of this run when it came from the console script, else one rebuilt from the config."""
    import shlex
    import sys

    if len(sys.argv) > 1 and sys.argv[1] == "evaluate" and Path(sys.argv[0]).name in ("synthnet", "cli.py"):
        return "synthnet " + shlex.join(sys.argv[1:])
    return (f"synthnet evaluate target={cfg.target.name} task={cfg.task.name} paths.root={cfg.paths.root} "
            f"evaluate.count={count} evaluate.steps={steps}")


def machine(device: str) -> str:
    import torch

    text = f"{platform.system()} {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    if device != "cpu" and torch.accelerator.is_available():
        text += f", {torch.accelerator.current_accelerator()}"
    return text + f", device={device}"


def load_zoo(cfg: DictConfig, model, pool: str):
    """The zoo's final checkpoints (and the novelty pool) after checking they fit the config."""
    import torch

    from synthnet.evaluation.pipeline import ZooFinals
    from synthnet.evaluation.scoring import stack_state_dicts
    from synthnet.storage import load_state_dict
    from synthnet.zoo import checkpoint_header, list_runs, step_of

    runs = list_runs(cfg.paths.checkpoints_dir)
    hint = f"make one with `synthnet zoo target={cfg.target.name} task={cfg.task.name}`"
    if not runs:
        raise SynthNetError(f"no zoo in {cfg.paths.checkpoints_dir}; {hint}")
    target, task = container(cfg.target), container(cfg.task)
    seeds, finals, val_accuracy, pool_states, pool_seeds, recipe, other_members = [], [], [], [], [], None, 0
    for seed, paths in sorted(runs.items()):
        metadata = checkpoint_header(paths[-1])
        if not metadata.get("final"):
            log.warning("zoo run %d is incomplete (last step %d); left out", seed, step_of(paths[-1]))
            continue
        if metadata.get("family") is not None and metadata.get("task_config") == task and \
                metadata.get("target_config") != target:  # a family zoo: the evaluated architecture's runs only
            other_members += 1
            continue
        if metadata.get("target_config") != target or metadata.get("task_config") != task:
            raise SynthNetError(f"{paths[-1]} was made for another target or task than "
                                f"target={cfg.target.name} task={cfg.task.name} with these options; {hint} "
                                f"under another paths.root")
        recipe = recipe or metadata["recipe"]
        state, _ = load_state_dict(paths[-1], model)
        seeds.append(seed)
        finals.append(state)
        val_accuracy.append(float(metadata["val_accuracy"]))
        if pool == "all":
            middle = [p for p in paths[:-1] if step_of(p) > 0]
            pool_states += [load_state_dict(p, model)[0] for p in middle]
            pool_seeds += [seed] * len(middle)
    if len(seeds) < 2:
        raise SynthNetError(f"the zoo in {cfg.paths.checkpoints_dir} has {len(seeds)} complete runs"
                            f"{' of this architecture (a family zoo)' if other_members else ''}; evaluation "
                            f"needs at least 2 ({hint} zoo.runs=16)")
    if other_members:
        log.info("family zoo: %d runs of %s, %d runs of its other members left out", len(seeds), target, other_members)
    stacked = stack_state_dicts(finals)
    pool_stack = stack_state_dicts(finals + pool_states) if pool_states else stacked
    pool_name = "checkpoints (every step > 0)" if pool == "all" else "final checkpoints"
    return ZooFinals(seeds, stacked, val_accuracy, {k: v.to(torch.float32) for k, v in pool_stack.items()},
                     pool_name, seeds + pool_seeds), recipe


@command("evaluate", "score generated networks against SGD twins, the zoo and trivial baselines (evaluate.*)")
def evaluate_command(cfg: DictConfig) -> None:
    """Under ``torchrun --nproc_per_node=N`` the SGD twins (the costly part) are shared: each process trains
    twins ``rank, rank + N, ...`` and all gather them; rank 0 alone generates (timed with the other
    processes waiting), scores and writes the report."""
    from synthnet import distributed

    rank, _ = distributed.setup(cfg.device)
    if rank:
        logging.getLogger("synthnet").setLevel(logging.WARNING)  # rank 0 alone logs
    try:
        _evaluate(cfg)
    finally:
        distributed.teardown()


def _evaluate(cfg: DictConfig) -> None:
    from tqdm.auto import tqdm

    from synthnet import distributed
    from synthnet.evaluation.baselines import build_baselines
    from synthnet.evaluation.pipeline import Generated, Options, evaluate
    from synthnet.evaluation.report import write_report
    from synthnet.evaluation.twins import train_twins
    from synthnet.generation import check_layout, generate_networks, target_layout
    from synthnet.generators import check_generator_matches, load_generator
    from synthnet.tasks import build_task
    from synthnet.targets import build_target, init_state_dict
    from synthnet.zoo.training import Recipe, steps_per_epoch

    count = int(cfg.evaluate.count)
    steps = int(cfg.evaluate.steps)
    pool = cfg.evaluate.novelty_pool
    if pool not in ("final", "all"):
        raise SynthNetError(f"evaluate.novelty_pool must be final or all, got {pool!r}")
    device = distributed.local_device(cfg.device)
    distributed.check_enough(count, "evaluate.count")
    main = distributed.is_main_process()
    target_config, task_config = container(cfg.target), container(cfg.task)
    task = build_task(task_config, cfg.paths.data_dir)
    model = build_target(target_config, task.input_shape, task.num_classes).to(device)
    specs = model.layer_specs()
    files = generator_files(cfg)
    kept = (steps + 1) * len(files) + int(cfg.evaluate.twin_checkpoints) + 2 + 8
    check_networks_in_memory(cfg, f"evaluate.count={count} (every generation step of every generator, every twin "
                             f"checkpoint, the baselines)", count * kept, sum(p.numel() for p in model.parameters()))
    loaded_files = []
    for path in files:  # every generator must fit before any work starts
        loaded = load_generator(path, device)
        check_generator_matches(path, loaded, target_config, task_config)
        loaded_files.append((path, loaded))
    held_out_configs = []
    if cfg.evaluate.architectures:  # each builds and every generator serves it, before any work
        from synthnet.evaluation.architectures import check_architectures

        held_out_configs, largest = check_architectures(container(cfg.evaluate.architectures), target_config,
                                                        task_config, task, loaded_files)
        # one architecture at a time: its twins and every generator's networks
        check_networks_in_memory(cfg, f"evaluate.architectures ({len(held_out_configs)} architectures, "
                                 f"evaluate.count={count} networks each from {len(files)} generator(s) and the "
                                 f"twins)", count * (len(files) + 2), largest)
    zoo, recipe_fields = load_zoo(cfg, model, pool)
    seeds = list(range(int(cfg.evaluate.first_seed), int(cfg.evaluate.first_seed) + count))
    log.info("%s; zoo of %d runs; %d evaluation inits from seed %d; %d generator(s)", task.summary(),
             len(zoo.seeds), count, seeds[0], len(files))
    stages = 2 * len(files) + 3 + 2 + 4 + len(cfg.evaluate.noise_scales)  # see the bar.update / tick calls
    bar = tqdm(total=stages, desc="evaluate", disable=not (cfg.progress and main), leave=False)

    generated = []
    for path, loaded in loaded_files if main else []:  # the others wait at the barrier: nothing shares the clock
        bar.set_postfix_str(f"generate {path.stem}")
        _, layout = target_layout(target_config, task.input_shape, task.num_classes, loaded.chunk_size,
                                  loaded.bias_chunk)
        check_layout(layout, loaded.metadata.get("num_values"), str(path))
        try:
            generate_networks(loaded.model, layout, target_config, task.input_shape, task.num_classes, seeds[:1],
                              steps, device=device)  # warm-up, not timed
        except RuntimeError as exc:
            raise SynthNetError(f"{path} cannot generate {cfg.target.name} networks of this size "
                                f"({str(exc).strip().splitlines()[0]}); leave it out of evaluate.generators") from None
        runs = [generate_networks(loaded.model, layout, target_config, task.input_shape, task.num_classes, seeds,
                                  steps, device=device) for _ in range(int(cfg.evaluate.timing_repeats))]
        out, seconds = runs[-1], sorted(r.seconds for r in runs)[len(runs) // 2]  # median wall time
        generated.append(Generated(path.stem, out.state_dicts, seconds,
                                   {"file": str(path), "generator": loaded.config.get("name"), "steps": steps}))
        bar.update(1)

    recipe = Recipe(**{**recipe_fields, "checkpoint_every": None})
    final_step = int(recipe.epochs) * steps_per_epoch(task, recipe)
    every = max(1, final_step // int(cfg.evaluate.twin_checkpoints))
    bar.set_postfix_str(f"SGD twins ({final_step} steps)")
    if bar.disable and main:  # without a bar (progress=false, logs to a file) the log says where it is
        log.info("evaluate: training %d SGD twins, %d steps each", count, final_step)
    inits = [init_state_dict(target_config, task.input_shape, task.num_classes, s) for s in seeds]
    group_size = None if cfg.zoo.group_size is None else int(cfg.zoo.group_size)
    distributed.barrier()
    twins = train_twins(model, inits, seeds, task, Recipe(**{**recipe_fields, "checkpoint_every": every}),
                        group_size=group_size)  # trained as the zoo trains this target
    held_out = []
    if held_out_configs:  # every rank: their twins are shared like the main ones
        from synthnet.evaluation.architectures import evaluate_architectures

        held_out = evaluate_architectures(
            configs=held_out_configs, task=task, generators=loaded_files, seeds=seeds, steps=steps, recipe=Recipe(**{**recipe_fields,
                                                                                "checkpoint_every": None}),
            zoo_finals=zoo.finals, zoo_model=model, device=device, group_size=group_size,
            progress=bar.set_postfix_str)
    if not main:
        return
    bar.update(3)
    log.info("twins: test accuracy %.4f after %d steps (%.1f s of training, %d at a time)",
             float(twins.test_accuracy[-1].mean()), final_step, float(twins.seconds[-1].sum()), twins.group_size)

    baselines = build_baselines(zoo.finals, zoo.seeds, zoo.val_accuracy, specs, count_per_baseline=count,
                                average_size=int(cfg.evaluate.average_size),
                                noise_scales=[float(s) for s in cfg.evaluate.noise_scales], seed=int(cfg.seed))
    options = Options(insensitive_below=float(cfg.evaluate.insensitive_below),
                      collapse_below=float(cfg.evaluate.collapse_below),
                      prune_fractions=tuple(float(p) for p in cfg.evaluate.prune_fractions),
                      quantize_bits=tuple(int(b) for b in cfg.evaluate.quantize_bits),
                      zoo_rows=int(cfg.evaluate.zoo_rows))

    def tick(stage: str) -> None:
        bar.set_postfix_str(stage)
        bar.update(1)
        if bar.disable:
            log.info("evaluate: %s", stage)

    start = time.perf_counter()
    result = evaluate(model=model, specs=specs, task=task, zoo=zoo, twins=twins, generated=generated,
                      baselines=baselines, options=options, progress=tick)
    bar.close()
    if held_out:
        result["architectures"] = held_out
    header = {"target": cfg.target.name, "target_config": target_config, "task": cfg.task.name,
              "generation_steps": steps, "networks_per_row": count, "evaluation_seeds": f"{seeds[0]}..{seeds[-1]}",
              "recipe": recipe_fields, "machine": machine(str(cfg.device)),
              "timing": f"from the inits in hand to the weights in hand; generation: median of "
                        f"{cfg.evaluate.timing_repeats} runs after a warm-up; twins: one run, {twins.group_size} at "
                        f"a time, checkpoint every {every} steps (checkpoint scoring not timed)",
              "command": reproduce_command(cfg, count, steps),
              "scoring_seconds": round(time.perf_counter() - start, 1)}
    paths = write_report(result, header, cfg.paths.reports_dir)
    print(f"evaluate: {cfg.target.name} on {cfg.task.name} -> {paths['markdown']}")
    for name, gen in result["generators"].items():
        h = gen["headline"]
        print(f"| {name} | acc ratio {h['accuracy_ratio']:.3f} | novelty ratio {h['novelty_ratio']:.3f} | "
              f"diversity ratio {h['diversity_ratio']:.3f} | sensitivity {h['input_sensitivity_ratio']:.3f}"
              f"{' (INPUT-INSENSITIVE)' if gen['input_sensitivity']['input_insensitive'] else ''}"
              f"{' (COLLAPSED)' if gen['input_sensitivity'].get('collapsed') else ''} | "
              f"time ratio {h['time_to_accuracy_ratio']:.1f} | dominated by "
              f"{', '.join(gen['placement']['dominated_by']) or 'no baseline'} |")
    for row in held_out:
        print(f"| {row['generator']} on {row['architecture']} ({'seen' if row['seen'] else 'unseen'}) | test accuracy "
              f"{row['generated_accuracy']:.4f} | twins {row['twin_accuracy']:.4f} | acc ratio "
              f"{row['accuracy_ratio']:.3f} | diversity ratio {row['diversity_ratio']:.3f} |")
    print(f"| SGD twins | test accuracy {result['twins']['test_accuracy']['mean']:.4f} | max IoU vs zoo "
          f"{result['twins']['max_iou_vs_zoo']['mean']:.3f} |")
