"""``synthnet train method=task``: train the generator through the networks it generates.

The curriculum's second stage. Starts from ``method.source`` (default
``<generators_dir>/<generator>-imitation.safetensors``, trained first with ``method.imitation``
when missing), keeps a frozen copy of it as the anchor, and runs
:func:`synthnet.methods.task.train_task` on fresh inits (seeds ``method.first_seed`` on) with
the task's **training** split; selection and early stopping use networks generated from
``method.val_inits`` held-out inits, scored on the **validation** split.
``method.from_scratch=true`` starts from a fresh generator with no anchor: the ablation that
collapses into one network for every init (the evaluation flags it). ``method.start=fresh`` starts
from a fresh generator and anchors to it: its output is its input, so that anchor ties each
output to its own init (for targets whose imitation generator is too poor to start from).
``method.family_widths`` / ``method.family_depths`` train over a family of architectures: each step draws its
own member (:func:`synthnet.targets.family_member`), and validation averages over four members. They start
fresh (``method.start=fresh``) or from an imitation generator trained on a zoo over the same family
(``zoo.family_widths`` / ``zoo.family_depths``).

Writes ``train.output`` or ``<generator>-task.safetensors`` (``-task-scratch`` for the
ablation) once, at the end, with ``finished: true`` and the selected step in its header;
while training, the resumable state lives in ``<generators_dir>/resume/<name>`` (imitation's
convention) and is removed at the end. Per-step records go to ``<stem>.metrics.jsonl``
and TensorBoard (``<target_dir>/tensorboard/<stem>``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from synthnet import distributed
from synthnet.config import container, settings as settings_of
from synthnet.errors import SynthNetError

log = logging.getLogger("synthnet")

def task_path(cfg: DictConfig) -> Path:
    """``train.output`` (:func:`synthnet.commands.artifacts.train_output`) or
    ``<generators_dir>/<generator>-task[-scratch|-fresh].safetensors``."""
    from synthnet.commands.artifacts import train_output

    suffix = "-scratch" if cfg.method.get("from_scratch") else "-fresh" if cfg.method.get("start") == "fresh" else ""
    return train_output(cfg, Path(cfg.paths.generators_dir) / f"{cfg.generator.name}-task{suffix}.safetensors")


def train_task_command(cfg: DictConfig) -> Path:
    from synthnet.commands.artifacts import (load_resume_state, metrics_log, refuse_to_replace, resume_path,
                                             save_resume_state)
    from synthnet.commands.artifacts import imitation_path
    from synthnet.commands.train_imitation import ensure_imitation
    from synthnet.generation import check_layout, init_tokens, target_layout
    from synthnet.targets import architecture_tag, family_member
    from synthnet.generators import (build_generator, check_generator_matches, family_of, load_generator,
                                     save_generator)
    from synthnet.methods.imitation import EMA
    from synthnet.methods.task import TaskSettings, TaskState, step_seeds, train_task, validation_metrics
    from synthnet.storage import read_metadata
    from synthnet.tasks import build_task

    method = container(cfg.method)
    steps = cfg.method.generation_steps
    settings = settings_of(TaskSettings, cfg.method, seed=int(cfg.seed),
                           generation_steps=int(cfg.generate.steps if steps is None else steps),
                           **({"anchor_weight": 0.0} if cfg.method.from_scratch else {}))  # nothing to anchor to
    device = distributed.local_device(cfg.device)
    main = distributed.is_main_process()
    target_config, task_config = container(cfg.target), container(cfg.task)
    first_seed, val_first_seed = int(method["first_seed"]), int(method["val_first_seed"])
    val_count = int(cfg.method.val_inits)
    last_train_seed = first_seed + settings.steps * settings.inits_per_step
    if first_seed <= val_first_seed < last_train_seed or val_first_seed <= first_seed < val_first_seed + val_count:
        raise SynthNetError(f"method.first_seed {first_seed} + steps x inits_per_step overlaps the validation inits "
                            f"(method.val_first_seed {val_first_seed}); move one of them")
    torch.manual_seed(int(cfg.seed))

    from_scratch = bool(method.get("from_scratch"))
    start = str(method["start"])
    widths, depths = [int(w) for w in method["family_widths"]], [int(d) for d in method["family_depths"]]
    family = bool(widths or depths)
    if family:
        if cfg.generator.name == "flat_mlp":
            raise SynthNetError("generator=flat_mlp reads one vector of fixed length and cannot train over a family "
                                "of architectures")
        family_member(target_config, widths, depths, 0)  # a target without families is refused here
        if not (from_scratch or start == "fresh") and not method.get("source") and not imitation_path(cfg).exists():
            _check_family_zoo(cfg, widths, depths)  # before imitation trains on a zoo that cannot serve the family
    if from_scratch or start == "fresh":
        source, reference, generator_config, chunk_size, source_fingerprint = None, None, container(cfg.generator), \
            int(cfg.generator.get("chunk_size", 64)), None
    else:
        source = ensure_imitation(cfg)
        loaded = load_generator(source, device)
        check_generator_matches(source, loaded, target_config, task_config)
        if family and [sorted(v) for v in family_of(loaded.metadata)] != [sorted(widths), sorted(depths)]:
            trained = family_of(loaded.metadata)
            raise SynthNetError(f"{source} was trained over widths {trained[0] or 'none'} and depths "
                                f"{trained[1] or 'none'}, not the family method.family_widths={widths} "
                                f"method.family_depths={depths}: train its imitation on a zoo over that family "
                                f"(zoo.family_widths / zoo.family_depths), or add method.start=fresh")
        generator_config, chunk_size = loaded.config, loaded.chunk_size
        if generator_config != container(cfg.generator):
            raise SynthNetError(f"{source} was trained with other generator settings than generator="
                                f"{cfg.generator.name} with these options; pass the same generator.* overrides")
        reference = loaded.model
        source_fingerprint = loaded.metadata.get("fingerprint")
    task = build_task(task_config, cfg.paths.data_dir)
    bias_chunk = bool(generator_config.get("bias_chunk", False))
    target, cpu_layout = target_layout(target_config, task.input_shape, task.num_classes, chunk_size, bias_chunk)
    if source is not None:
        check_layout(cpu_layout, loaded.metadata.get("num_values"), str(source))
    target = target.to(device)

    path = task_path(cfg)
    state_path = resume_path(path)
    fingerprint = hashlib.sha256(json.dumps(
        [generator_config, method, target_config, task_config, source_fingerprint, int(cfg.seed),
         settings.generation_steps], sort_keys=True, default=str).encode()).hexdigest()[:16]
    refuse_to_replace(cfg, path, fingerprint)
    if cfg.train.resume and path.exists() and not state_path.exists():
        meta = read_metadata(path)
        if meta.get("fingerprint") == fingerprint and meta.get("finished"):
            if main:
                print(f"train: {path} is already trained with these settings (train.resume=false retrains)")
            return path

    model = build_generator(generator_config, cpu_layout).to(device)
    if reference is not None:
        model.load_state_dict(reference.state_dict())
    elif start == "fresh" and not from_scratch:  # anchor to the fresh generator, whose output is its input
        reference = copy.deepcopy(model).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    state = TaskState(step=0, model=model, ema=EMA(model, settings.ema_decay), optimizer=optimizer, best=None)
    if cfg.train.resume and state_path.exists():
        parts, meta = load_resume_state(state_path, optimizer, device, fingerprint)
        model.load_state_dict(parts["model"])
        state.ema.model.load_state_dict(parts["ema"])
        state.best = parts.get("best") or None
        state.step, state.best_step = int(meta["step"]), int(meta["best_step"])
        state.best_score = float(meta["best_score"])
        state.evaluations_since_best = int(meta["evaluations_since_best"])
        log.info("resuming %s from step %d (best %.4f at step %d)", path, state.step, state.best_score,
                 state.best_step)
    else:
        log.info("task loss: %s from %s, %d steps x %d inits x %d examples, %d generation steps, anchor %.3g -> %s",
                 generator_config["name"], source or ("scratch" if from_scratch else "a fresh generator"),
                 settings.steps, settings.inits_per_step, settings.batch_size, settings.generation_steps,
                 settings.anchor_weight, path)

    architectures: dict[str, tuple] = {}

    def architecture(config: dict) -> tuple:  # (target on the device, CPU layout), built once per architecture
        tag = architecture_tag(config)
        if tag not in architectures:
            member_target, member_layout = target_layout(config, task.input_shape, task.num_classes, chunk_size,
                                                         bias_chunk)
            architectures[tag] = (member_target.to(device), member_layout)
        return architectures[tag]

    def make_inits(step: int):  # (B, tokens, chunk); seeds never reused; a family adds the step's architecture
        seeds = step_seeds(first_seed, step, settings.inits_per_step)
        if not family:
            return init_tokens(target_config, task.input_shape, task.num_classes, seeds, cpu_layout).to(device)
        member = family_member(target_config, widths, depths, int(cfg.seed) * 1_000_003 + first_seed + step)
        member_target, member_layout = architecture(member)
        return (init_tokens(member, task.input_shape, task.num_classes, seeds, member_layout).to(device),
                member_layout, member_target)

    # validation: the target's own architecture, or for a family a few members (fixed by their seeds)
    groups = 1 if not family else min(4, val_count)
    val_sets = []
    for j in range(groups):
        seeds = range(val_first_seed + j * val_count // groups, val_first_seed + (j + 1) * val_count // groups)
        member = target_config if not family else family_member(target_config, widths, depths, val_first_seed + j)
        member_target, member_layout = (target, cpu_layout) if not family else architecture(member)
        val_sets.append((architecture_tag(member), len(seeds), member_target, member_layout.to(device),
                         init_tokens(member, task.input_shape, task.num_classes, seeds, member_layout).to(device)))
    x_val, y_val = task.x_val.to(device), task.y_val.to(device)

    def validate(ema_model) -> dict[str, float]:
        if not family:
            _, _, member_target, member_layout, inits = val_sets[0]
            return validation_metrics(ema_model, inits, member_layout, settings.generation_steps, member_target,
                                      x_val, y_val)
        totals, summed, per_member = {}, {}, {}
        for tag, count, member_target, member_layout, inits in val_sets:
            metrics = validation_metrics(ema_model, inits, member_layout, settings.generation_steps, member_target,
                                         x_val, y_val)
            per_member[f"val_accuracy[{tag}]"] = metrics["val_accuracy"]
            for key, value in metrics.items():
                if value == value:  # a one-network group has no disagreement or spread (NaN)
                    summed[key] = summed.get(key, 0.0) + count * value
                    totals[key] = totals.get(key, 0) + count
        return {**{key: value / totals[key] for key, value in summed.items()}, **per_member}

    on_metrics, writer = metrics_log(cfg, path, state.step, "task") if main else (None, None)

    header = {"method": "task", "method_config": method, "fingerprint": fingerprint, "steps": settings.steps,
              "generation_steps": settings.generation_steps, "input_shape": list(task.input_shape),
              "num_classes": task.num_classes, "num_tokens": cpu_layout.num_tokens, "from_scratch": from_scratch,
              "start": "fresh" if from_scratch else start,
              "source": str(source) if source else None, "source_fingerprint": source_fingerprint,
              "task_first_seed": first_seed, "val_first_seed": val_first_seed, "val_inits": val_count}

    def on_save(current: TaskState) -> None:
        finished = current.step >= settings.steps or current.stopped_early
        if not finished:
            parts = {"model": current.model.state_dict(), "ema": current.ema.model.state_dict(),
                     "best": current.best or {}}
            save_resume_state(state_path, parts, current.optimizer, {
                "fingerprint": fingerprint, "step": current.step, "best_step": current.best_step,
                "best_score": current.best_score, "evaluations_since_best": current.evaluations_since_best})
            return
        selected = copy.deepcopy(current.ema.model)
        selected.load_state_dict(current.best_model_state)
        scalars = {k: v for k, v in current.metrics.items() if isinstance(v, (int, float))}
        save_generator(path, selected, config=generator_config, target_config=target_config,
                       task_config=task_config, chunk_size=chunk_size,
                       extra={**header, "finished": True, "step": current.step, "best_step": current.best_step,
                              "best_val_accuracy": current.best_score, "stopped_early": current.stopped_early,
                              "metrics": scalars})
        if state_path.exists():
            state_path.unlink()

    try:
        state = train_task(state, reference, settings, layout=cpu_layout, target=target, x_train=task.x_train,
                           y_train=task.y_train, make_inits=make_inits, validate=validate, on_metrics=on_metrics,
                           on_save=on_save if main else None, progress=bool(cfg.progress))
    finally:
        if writer is not None:
            writer.close()
    distributed.barrier()  # rank 0 has written the generator before any rank goes on
    if main:
        print(f"train: {generator_config['name']} (task{' from scratch' if from_scratch else ''}) -> {path}: "
              f"best val accuracy {state.best_score:.4f} at step {state.best_step} of {state.step}"
              f"{' (early stop)' if state.stopped_early else ''}")
    return path


def _check_family_zoo(cfg: DictConfig, widths: list[int], depths: list[int]) -> None:
    """A family trained from imitation needs the imitation of a zoo over that same family."""
    from synthnet.methods.data import zoo_architectures

    try:
        _, family = zoo_architectures(cfg.paths.checkpoints_dir)
    except SynthNetError:
        family = None
    if family is None or sorted(family["widths"]) != sorted(widths) or sorted(family["depths"]) != sorted(depths):
        raise SynthNetError(f"method.family_widths={widths} / family_depths={depths} start from an imitation generator "
                            f"of a zoo over the same family, and {cfg.paths.checkpoints_dir} holds none: build it with "
                            f"`synthnet zoo zoo.family_widths={widths} zoo.family_depths={depths}`, or add "
                            f"method.start=fresh")

