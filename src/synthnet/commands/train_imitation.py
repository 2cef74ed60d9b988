"""``synthnet train method=imitation``: the generator learns to map each zoo checkpoint to a later one of
the same run; :func:`ensure_imitation` trains it first when a later stage (task loss, GRPO) needs it."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from synthnet import distributed
from synthnet.commands.artifacts import (generator_path, imitation_path, load_resume_state, metrics_log,
                                         refuse_to_replace, resume_path, save_resume_state, train_output)
from synthnet.config import container, settings as settings_of
from synthnet.errors import SynthNetError

log = logging.getLogger("synthnet")

def train_imitation_command(cfg: DictConfig) -> None:
    import torch

    from synthnet.generation import target_layout
    from synthnet.generators import build_generator, save_generator
    from synthnet.methods.data import load_zoo_tokens, split_runs, zoo_architectures
    from synthnet.methods.imitation import (EMA, ImitationSettings, TrainState,
                                            train_imitation)
    from synthnet.evaluation.scoring import accuracy_and_loss
    from synthnet.sampling import sample
    from synthnet.tasks import build_task
    from synthnet.tokenization import detokenize

    int(cfg.generate.steps)
    method, generator_config = container(cfg.method), container(cfg.generator)
    target_config, task_config = container(cfg.target), container(cfg.task)
    settings = settings_of(ImitationSettings, cfg.method, seed=int(cfg.seed))
    device = distributed.local_device(cfg.device)
    main = distributed.is_main_process()
    torch.manual_seed(int(cfg.seed))
    task = build_task(task_config, cfg.paths.data_dir)
    chunk_size, bias_chunk = int(generator_config.get("chunk_size", 64)), bool(generator_config.get("bias_chunk", False))
    template, layout = target_layout(target_config, task.input_shape, task.num_classes, chunk_size, bias_chunk)
    architectures, family = zoo_architectures(cfg.paths.checkpoints_dir)
    if family is None:  # a zoo of one target
        zoo = load_zoo_tokens(cfg.paths.checkpoints_dir, layout, template.layer_specs(), template.state_dict(),
                              target_config=target_config, max_runs=method.get("runs"))
        train_index, val_index = split_runs(zoo.num_runs, int(method.get("val_runs") or 0))
        train_groups, val_groups, templates = [zoo.select(train_index)], [zoo.select(val_index)], [template]
        checkpoints = zoo.times.shape[1]
    else:  # a family zoo (zoo.family_*): one group per architecture, runs split by seed across the whole zoo
        if family["base"] != target_config:
            raise SynthNetError(f"the family zoo in {cfg.paths.checkpoints_dir} was built around target "
                                f"{family['base']}, not {target_config}; pass the target= overrides it was built with")
        if generator_config["name"] == "flat_mlp":
            raise SynthNetError("generator=flat_mlp reads one vector of fixed length and cannot train over a family "
                                "zoo; use generator=perceiver_moe")
        seeds = sorted(s for _, group in architectures.values() for s in group)[:method.get("runs") or None]
        train_index, val_index = split_runs(len(seeds), int(method.get("val_runs") or 0))
        val_seeds = {seeds[i] for i in val_index}
        train_groups, val_groups, templates = [], [], []
        for config, group in architectures.values():
            group = [s for s in group if s in set(seeds)]
            if not group:
                continue
            member, member_layout = target_layout(config, task.input_shape, task.num_classes, chunk_size, bias_chunk)
            tokens = load_zoo_tokens(cfg.paths.checkpoints_dir, member_layout, member.layer_specs(),
                                     member.state_dict(), target_config=config, seeds=group)
            train_groups.append(tokens.select([i for i, s in enumerate(tokens.seeds) if s not in val_seeds]))
            val_groups.append(tokens.select([i for i, s in enumerate(tokens.seeds) if s in val_seeds]))
            templates.append(member)
        checkpoints = max(g.times.shape[1] for g in train_groups)
        method = {**method, "family_widths": list(family["widths"]), "family_depths": list(family["depths"])}
        log.info("family zoo: %d architectures (%s)", len(train_groups),
                 ", ".join(f"{g.target_config.get('hidden', g.target_config.get('channels'))}: "
                           f"{g.num_runs} + {v.num_runs} runs" for g, v in zip(train_groups, val_groups)))
    train_runs = sum(g.num_runs for g in train_groups)
    train_seeds = sorted(s for g in train_groups for s in g.seeds)
    val_seeds = sorted(s for g in val_groups for s in g.seeds)
    log.info("%s; zoo %s: %d training runs (seeds %s), %d validation runs, %d checkpoints each, %d tokens x %d",
             task.summary(), cfg.paths.checkpoints_dir, train_runs, _seed_range(train_seeds), len(val_seeds),
             checkpoints, layout.num_tokens, layout.chunk_size)
    if train_runs < 128:
        log.warning("only %d training runs: expect a generator that generalises poorly to new inits (digits "
                    "MLP, 4 steps: 28 runs -> ~55%% test accuracy, 252 -> ~80%%, 1020 -> ~86%%); build more "
                    "with `synthnet zoo zoo.runs=1024` (about a minute)", train_runs)

    path = train_output(cfg, generator_path(cfg, None))
    state_path = resume_path(path)
    fingerprint = hashlib.sha256(json.dumps(
        [generator_config, method, target_config, task_config, train_seeds + val_seeds, int(cfg.seed)], sort_keys=True,
        default=str).encode()).hexdigest()[:16]
    refuse_to_replace(cfg, path, fingerprint)
    model = build_generator(generator_config, layout).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    ema = EMA(model, settings.ema_decay)
    start_step = 0
    if cfg.train.resume and state_path.exists():
        parts, meta = load_resume_state(state_path, optimizer, device, fingerprint)
        model.load_state_dict(parts["model"])
        ema.model.load_state_dict(parts["ema"])
        start_step = int(meta["step"])
        log.info("resuming %s from step %d", path, start_step)
    elif cfg.train.resume and path.exists():
        from synthnet.storage import read_metadata
        meta = read_metadata(path)
        if meta.get("fingerprint") == fingerprint and meta.get("step") == settings.steps:
            if main:
                print(f"train: {path} is already trained with these settings (train.resume=false retrains)")
            return
    if start_step == 0:
        log.info("generator %s: %d parameters -> %s", generator_config["name"],
                 sum(p.numel() for p in model.parameters()), path)

    # held-out evaluation: networks generated from the validation runs' inits (every architecture of a family
    # zoo), scored on the val split; means over all validation runs
    steps = int(cfg.generate.steps)
    x_val, y_val = task.x_val.to(device), task.y_val.to(device)
    scored = [(member.to(device), group) for member, group in zip(templates, val_groups) if group.num_runs]
    sgd_val = (float(torch.cat([accuracy_and_loss(member, {k: v.to(device) for k, v in detokenize(
        group.tokens[:, -1], group.layout).items()}, x_val, y_val)[0] for member, group in scored]).mean())
        if scored else None)

    def evaluate(ema_model) -> dict[str, float]:
        if not scored:
            return {}
        accuracies = []
        for member, group in scored:
            with torch.no_grad():
                result = sample(ema_model, group.tokens[:, 0].to(device), group.layout.to(device), steps)
            accuracies.append(accuracy_and_loss(member, detokenize(result.final, group.layout), x_val, y_val)[0])
        return {f"val_accuracy_{steps}_steps": float(torch.cat(accuracies).mean()), "val_accuracy_sgd": sgd_val}

    on_metrics, writer = metrics_log(cfg, path, start_step, "imitation") if main else (None, None)

    extra = {"method": method["name"], "method_config": method, "fingerprint": fingerprint,
             "steps": settings.steps, "input_shape": list(task.input_shape), "num_classes": task.num_classes,
             "num_tokens": layout.num_tokens, "zoo": str(cfg.paths.checkpoints_dir),
             "train_seeds": train_seeds, "val_seeds": val_seeds}

    def on_save(state: TrainState) -> None:
        # the generator file is written once, finished; until then only the resume state exists
        if state.step >= settings.steps:
            scalars = {k: v for k, v in state.metrics.items() if isinstance(v, (int, float))}
            save_generator(path, state.ema.model, config=generator_config, target_config=target_config,
                           task_config=task_config, chunk_size=layout.chunk_size,
                           extra={**extra, "step": state.step, "metrics": scalars, "finished": True})
        if state.step < settings.steps:
            save_resume_state(state_path, {"model": state.model.state_dict(), "ema": state.ema.model.state_dict()},
                              state.optimizer, {"fingerprint": fingerprint, "step": state.step})
        elif state_path.exists():
            state_path.unlink()

    metrics = train_imitation(model, optimizer, train_groups, settings, ema=ema, val_data=val_groups,
                              start_step=start_step, evaluate=evaluate, on_metrics=on_metrics,
                              on_save=on_save if main else None,
                              progress=bool(cfg.progress))
    if writer is not None:
        writer.close()
    distributed.barrier()  # rank 0 has written the generator before any rank goes on
    if not main:
        return
    print(f"train: {generator_config['name']} ({method['name']}) -> {path}")
    rows = [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in metrics.items()
            if isinstance(v, (int, float))]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"| {k.ljust(width)} | {v} |" for k, v in rows))


def _seed_range(seeds: list[int]) -> str:
    return f"{seeds[0]}..{seeds[-1]}" if len(seeds) > 1 else str(seeds[0])


def ensure_imitation(cfg: DictConfig) -> Path:
    """The generator file a later stage starts from (``imitation_path``), training imitation first with
    ``method.imitation`` when it is the default file and it is missing."""
    path = imitation_path(cfg)
    if path.exists():
        return path
    if cfg.method.get("source") or not cfg.method.get("imitation_first", True) or "imitation" not in cfg.method:
        raise SynthNetError(f"no imitation generator {path}; run `synthnet train method=imitation` first "
                            f"(same target, task and generator overrides) or set method.imitation_first=true")
    log.info("no %s yet: training imitation first (settings in method.imitation)", path.name)
    imitation_cfg = copy.deepcopy(cfg)
    OmegaConf.set_struct(imitation_cfg, False)
    imitation_cfg.method = OmegaConf.create(OmegaConf.to_container(cfg.method.imitation, resolve=True))
    if "train" in imitation_cfg:
        imitation_cfg.train.output = None  # train.output names the GRPO file, not the imitation one
    train_imitation_command(imitation_cfg)
    if not path.exists():
        raise SynthNetError(f"imitation training finished without writing {path}")
    return path
