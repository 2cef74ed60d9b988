"""``synthnet train method=grpo``: GRPO fine-tuning of an imitation-trained generator.

Starts from ``method.source`` (default ``<generators_dir>/<generator>-imitation.safetensors``),
training it first with the imitation settings in ``method.imitation`` when it is missing
and ``method.imitation_first`` is true (the curriculum: imitation, then GRPO, one config).
Runs :func:`synthnet.methods.grpo.train` with the reward chosen by ``reward=`` and writes
``train.output`` (default ``<generator>-grpo.safetensors``, or
``<generator>-grpo-<reward>.safetensors`` for a reward other than ``val_accuracy``): an
ordinary generator file whose header also records ``method: grpo``, the reward and its
options, the iteration reached and the imitation file it started from. Like every method, the
generator file is written once, finished; until then the policy and its Adam state live in
``<generators_dir>/resume/<name>`` (:func:`synthnet.commands.artifacts.resume_path`), where
``evaluate`` never looks. With ``train.resume`` a run continues exactly where it stopped; GRPO
keeps that state after finishing, so raising ``method.iterations`` continues exactly too.
Per-iteration records
go to ``<stem>.metrics.jsonl`` beside the generator and to TensorBoard
(``<target_dir>/tensorboard/<stem>``); the reward curve to ``<reports_dir>/<stem>-reward.png``.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from omegaconf import DictConfig

from synthnet.commands.artifacts import grpo_path, metrics_path, read_records, resume_path, stem_of
from synthnet.commands.train_imitation import ensure_imitation
from synthnet.config import container
from synthnet.errors import SynthNetError
from synthnet.storage import atomic_write_bytes, load_state_dict, read_metadata, save_state_dict

log = logging.getLogger("synthnet")

# --------------------------------------------------------------------------- resume state (safetensors)


def save_resume_state(path: Path, policy: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      metadata: Mapping[str, Any]) -> None:
    """The policy's weights and Adam's per-parameter tensors (imitation's flat naming, no pickling), atomically."""
    from synthnet.methods.imitation import optimizer_tensors

    tensors = {**{f"model.{k}": v for k, v in policy.state_dict().items()},
               **{f"optimizer.{k}": v for k, v in optimizer_tensors(optimizer).items()}}
    save_state_dict(path, tensors, metadata)


def load_resume_state(path: Path, policy: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    from synthnet.methods.imitation import load_optimizer_tensors

    tensors, _ = load_state_dict(path)
    policy.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
    load_optimizer_tensors(optimizer, {k.removeprefix("optimizer."): v for k, v in tensors.items()
                                       if k.startswith("optimizer.")})


# --------------------------------------------------------------------------- logs and plot


def plot_reward_curve(records: Sequence[Mapping[str, Any]], path: str | Path, title: str = "GRPO reward") -> None:
    """Reward mean (thin line, and its running mean over a tenth of the run) and min..max (band)
    of each iteration's candidates, written to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not records:
        return
    iterations = [r["iteration"] for r in records]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.fill_between(iterations, [r["reward_min"] for r in records], [r["reward_max"] for r in records],
                    alpha=0.25, label="min..max over candidates")
    means = [r["reward_mean"] for r in records]
    ax.plot(iterations, means, linewidth=0.8, alpha=0.6, label="mean over candidates")
    window = max(1, len(means) // 10)
    smoothed = [sum(means[max(0, i - window + 1):i + 1]) / len(means[max(0, i - window + 1):i + 1])
                for i in range(len(means))]
    ax.plot(iterations, smoothed, linewidth=2, label=f"running mean ({window} iterations)")
    ax.set_xlabel("GRPO iteration")
    ax.set_ylabel(records[-1].get("reward", "reward"))
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


# --------------------------------------------------------------------------- imitation first


# --------------------------------------------------------------------------- the command


def _settings(cfg: DictConfig, steps: int):
    import dataclasses

    from synthnet.methods.grpo import GRPOSettings

    values = {f.name: container(cfg.method)[f.name] for f in dataclasses.fields(GRPOSettings) if f.name != "steps"}
    if isinstance(values["noise_scale"], list):
        values["noise_scale"] = tuple(values["noise_scale"])
    return GRPOSettings(**values, steps=steps)


def train_grpo(cfg: DictConfig) -> Path:
    """Run the GRPO stage described by ``cfg`` (imitation first if needed); returns the generator file."""
    from synthnet.commands.artifacts import check_generator_matches
    from synthnet.generators import load_generator, save_generator
    from synthnet.methods import grpo
    from synthnet.methods.rewards import Reward
    from synthnet.generation import init_tokens, target_layout
    from synthnet.tasks import build_task
    from synthnet.tokenization import detokenize

    device = torch.device(cfg.device)
    target_config, task_config = container(cfg.target), container(cfg.task)
    iterations = int(cfg.method.iterations)
    steps = int(cfg.method.generation_steps) if cfg.method.get("generation_steps") is not None \
        else int(cfg.generate.steps)
    settings = _settings(cfg, steps)
    reward_options = {k: v for k, v in container(cfg.reward).items() if k != "name"}

    source = ensure_imitation(cfg)
    imitation = load_generator(source, device)
    check_generator_matches(source, imitation, target_config, task_config)
    task = build_task(task_config, cfg.paths.data_dir)
    model, cpu_layout = target_layout(target_config, task.input_shape, task.num_classes, imitation.chunk_size)
    model, layout = model.to(device), cpu_layout.to(device)
    reward = Reward(cfg.reward.name, model, task.x_val.to(device), task.y_val.to(device), reward_options,
                    scoring=str(cfg.method.get("scoring", "batched")))

    out_path = grpo_path(cfg)
    stem = stem_of(out_path)
    state_path = resume_path(out_path)
    jsonl_path = metrics_path(out_path)

    policy = imitation.model
    reference = copy.deepcopy(imitation.model)
    optimizer = torch.optim.Adam(policy.parameters(), lr=float(cfg.method.lr), weight_decay=float(cfg.method.weight_decay))
    start = 0
    resume = bool(cfg.get("train", {}).get("resume", True))
    found = state_path if resume and state_path.exists() else out_path if resume and out_path.exists() else None
    if found is not None:
        metadata = read_metadata(found)
        if metadata.get("method") != "grpo" or metadata.get("reward") != cfg.reward.name:
            raise SynthNetError(f"{found} is not a GRPO generator for reward {cfg.reward.name}; remove it "
                                f"or pass train.resume=false to start over")
        if metadata.get("imitation_fingerprint") != imitation.metadata.get("fingerprint"):
            raise SynthNetError(f"{found} was tuned from another version of {source.name}; remove it "
                                f"or pass train.resume=false to start over")
        free = {"iterations", "log_every", "save_every", "source", "imitation"}  # may change between runs
        same = lambda method: {k: v for k, v in (method or {}).items() if k not in free}  # noqa: E731
        if same(metadata.get("method_config")) != same(container(cfg.method)) or \
                metadata.get("reward_config") != container(cfg.reward):
            if not bool(cfg.train.get("overwrite", False)):
                raise SynthNetError(f"{found} was tuned with other GRPO settings; pass train.output=<new file> "
                                    f"to tune beside it, or train.overwrite=true to start it over (raising "
                                    f"method.iterations alone continues it)")
            found = None
    if found is not None:
        start = int(metadata.get("grpo_iteration", 0))
        if found == state_path:
            load_resume_state(state_path, policy, optimizer)
        else:  # a finished file without its state (removed by hand): its weights, a fresh Adam
            policy.load_state_dict(load_generator(out_path, device).model.state_dict())
            log.warning("no resume state for iteration %d of %s; Adam restarts", start, out_path.name)
        log.info("resuming GRPO from iteration %d of %d (%s)", start, iterations, found)
    if start >= iterations and out_path.exists():
        log.info("%s already holds %d GRPO iterations; nothing to do (raise method.iterations to go on)",
                 out_path, start)
        return out_path

    kept = [r for r in read_records(jsonl_path) if r["iteration"] <= start] if start else []
    atomic_write_bytes(jsonl_path, "".join(json.dumps(r) + "\n" for r in kept).encode())
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(Path(cfg.paths.target_dir) / "tensorboard" / stem), purge_step=start + 1 if start else None)

    batch = settings.inits_per_iteration
    first_seed = int(cfg.method.first_seed)

    def make_inits(iteration: int) -> torch.Tensor:  # (B, tokens, chunk); seeds never reused
        seeds = range(first_seed + iteration * batch, first_seed + (iteration + 1) * batch)
        return init_tokens(target_config, task.input_shape, task.num_classes, seeds, cpu_layout).to(device)

    def reward_fn(tokens: torch.Tensor) -> torch.Tensor:
        return reward(detokenize(tokens, layout))

    own = {"kind", "generator", "generator_config", "target", "target_config", "task", "task_config", "chunk_size",
           "num_values", "synthnet_version", "fingerprint", "step", "steps", "metrics", "method_config"}
    inherited = {k: v for k, v in imitation.metadata.items() if k not in own}  # input_shape, num_tokens, zoo, ...
    header = {**inherited, "method": "grpo", "method_config": container(cfg.method), "reward": cfg.reward.name,
              "reward_config": container(cfg.reward),
              "grpo_settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(settings).items()},
              "imitation_source": source.name, "imitation_fingerprint": imitation.metadata.get("fingerprint"),
              "imitation_method_config": imitation.metadata.get("method_config"), "grpo_iterations": iterations,
              "grpo_first_seed": first_seed, "generation_steps": steps}

    def save(iteration: int) -> None:
        meta = {**header, "grpo_iteration": iteration, "finished": iteration >= iterations}
        save_resume_state(state_path, policy, optimizer, meta)
        if iteration >= iterations:  # the generator file is written once, finished
            save_generator(out_path, policy, config=imitation.config, target_config=imitation.target_config,
                           task_config=imitation.task_config, chunk_size=imitation.chunk_size, extra=meta)

    def on_iteration(iteration: int, stats: dict[str, float]) -> None:
        record = {"iteration": iteration + 1, "reward": cfg.reward.name, **stats}
        with open(jsonl_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key in ("reward_mean", "reward_max", "reward_std", "tie_fraction", "kl", "clip_fraction", "approx_kl",
                    "loss", "seconds", "evaluations_per_second"):
            writer.add_scalar(f"grpo/{key}", stats[key], iteration + 1)
        done = iteration + 1
        if done % int(cfg.method.save_every) == 0 or done == iterations:
            save(done)

    log.info("GRPO %s on %s: %d iterations x %d inits x %d candidates, %d steps, reward %s -> %s",
             cfg.generator.name, cfg.task.name, iterations, batch, settings.group_size, steps, cfg.reward.name,
             out_path)
    try:
        grpo.train(policy, reference, optimizer, layout=layout, make_inits=make_inits, reward_fn=reward_fn,
                   settings=settings, iterations=iterations, start_iteration=start, noise_seed=int(cfg.seed) * 100003,
                   on_iteration=on_iteration, log_every=int(cfg.method.log_every),
                   progress=bool(cfg.progress))
    finally:
        writer.close()
    if not out_path.exists():  # the resume state was finished but its generator file was missing
        save(max(start, iterations))
    records = read_records(jsonl_path)
    plot_reward_curve(records, Path(cfg.paths.reports_dir) / f"{stem}-reward.png",
                      title=f"GRPO on {cfg.task.name}-{cfg.target.name}: {cfg.reward.name}")
    if records:
        eps = reward.evaluations_per_second
        print(f"grpo: {out_path} ({records[-1]['iteration']} iterations, reward {records[0]['reward_mean']:.4f} -> "
              f"{records[-1]['reward_mean']:.4f}, {eps:.0f} candidate evaluations/s)")
    return out_path
