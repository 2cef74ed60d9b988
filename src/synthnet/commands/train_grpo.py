"""``synthnet train method=grpo``: reinforcement on a reward no gradient reaches, of a trained generator.

``method.algorithm`` picks the optimiser: ``es`` (default; :mod:`synthnet.methods.es`, evolution
strategies on the generator's parameters, every candidate deterministic as ``generate`` makes it),
``grpo`` (:mod:`synthnet.methods.grpo`, policy gradient over Gaussian noise on the sampled
weights) or ``latent`` (:mod:`synthnet.methods.latent`, policy gradient over a per-network latent
that the generator is given here when it has none). ``bench/exploration.py`` compares them on the
same reward evaluations.

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
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from synthnet.commands.artifacts import (grpo_path, load_resume_state, metrics_log, metrics_path, read_records,
                                         resume_path, save_resume_state, stem_of)
from synthnet.commands.train_imitation import ensure_imitation
from synthnet.config import container, settings as settings_of
from synthnet.errors import SynthNetError
from synthnet.storage import read_metadata

log = logging.getLogger("synthnet")

# method.lr when it is null: bench/exploration.py (digits, 90% pruned reward) found 1e-3 for ES (1e-4 hardly moved
# it); GRPO keeps the 1e-4 it was tuned with
DEFAULT_LR = {"grpo": 1e-4, "es": 1e-3, "latent": 1e-2}


def train_grpo(cfg: DictConfig) -> Path:
    """Run the GRPO stage described by ``cfg`` (imitation first if needed); returns the generator file."""
    from synthnet.generators import check_generator_matches, load_generator, save_generator
    from synthnet.methods import es, grpo, latent
    from synthnet.methods.es import ESSettings
    from synthnet.methods.grpo import GRPOSettings
    from synthnet.methods.latent import LatentSettings
    from synthnet.evaluation.report import plot_reward_curve
    from synthnet.methods.rewards import Reward
    from synthnet.generation import check_layout, init_tokens, target_layout
    from synthnet.tasks import build_task
    from synthnet.tokenization import detokenize

    device = torch.device(cfg.device)
    target_config, task_config = container(cfg.target), container(cfg.task)
    iterations = int(cfg.method.iterations)
    steps = int(cfg.method.generation_steps) if cfg.method.get("generation_steps") is not None \
        else int(cfg.generate.steps)
    algorithm = str(cfg.method.get("algorithm", "grpo"))
    settings = settings_of({"es": ESSettings, "latent": LatentSettings}.get(algorithm, GRPOSettings), cfg.method,
                           steps=steps)
    reward_options = {k: v for k, v in container(cfg.reward).items() if k != "name"}

    source = ensure_imitation(cfg)
    imitation = load_generator(source, device)
    check_generator_matches(source, imitation, target_config, task_config)
    task = build_task(task_config, cfg.paths.data_dir)
    model, cpu_layout = target_layout(target_config, task.input_shape, task.num_classes, imitation.chunk_size,
                                      imitation.bias_chunk)
    check_layout(cpu_layout, imitation.metadata.get("num_values"), str(source))
    model, layout = model.to(device), cpu_layout.to(device)
    reward = Reward(cfg.reward.name, model, task.x_val.to(device), task.y_val.to(device), reward_options,
                    scoring=str(cfg.method.get("scoring", "batched")))

    out_path = grpo_path(cfg)
    stem = stem_of(out_path)
    state_path = resume_path(out_path)
    jsonl_path = metrics_path(out_path)

    policy, generator_config = imitation.model, imitation.config
    if algorithm == "latent":
        policy, generator_config = with_latent(imitation, settings.latent_dim, steps, int(cfg.seed), cpu_layout, device)
    reference = copy.deepcopy(imitation.model) if algorithm == "grpo" else None
    lr = float(cfg.method.lr) if cfg.method.get("lr") is not None else DEFAULT_LR[algorithm]
    trained = [policy.latent_mean] if algorithm == "latent" else policy.parameters()  # the latent policy: m only
    optimizer = torch.optim.Adam(trained, lr=lr, weight_decay=float(cfg.method.weight_decay))
    reference_mean = policy.latent_mean.detach().clone() if algorithm == "latent" else None
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
            policy.load_state_dict(load_resume_state(state_path, optimizer, device)[0]["model"])
        else:  # a finished file without its state (removed by hand): its weights, a fresh Adam
            policy.load_state_dict(load_generator(out_path, device).model.state_dict())
            log.warning("no resume state for iteration %d of %s; Adam restarts", start, out_path.name)
        log.info("resuming GRPO from iteration %d of %d (%s)", start, iterations, found)
    if start >= iterations and out_path.exists():
        log.info("%s already holds %d GRPO iterations; nothing to do (raise method.iterations to go on)",
                 out_path, start)
        return out_path

    on_metrics, writer = metrics_log(cfg, out_path, start, "grpo", index="iteration")

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
    header = {**inherited, "method": "grpo", "algorithm": algorithm, "method_config": container(cfg.method), "reward": cfg.reward.name,
              "reward_config": container(cfg.reward),
              "grpo_settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(settings).items()},
              "imitation_source": source.name, "imitation_fingerprint": imitation.metadata.get("fingerprint"),
              "imitation_method_config": imitation.metadata.get("method_config"), "grpo_iterations": iterations,
              "grpo_first_seed": first_seed, "generation_steps": steps}

    def save(iteration: int) -> None:
        meta = {**header, "grpo_iteration": iteration, "finished": iteration >= iterations}
        save_resume_state(state_path, {"model": policy.state_dict()}, optimizer, meta)
        if iteration >= iterations:  # the generator file is written once, finished
            save_generator(out_path, policy, config=generator_config, target_config=imitation.target_config,
                           task_config=imitation.task_config, chunk_size=imitation.chunk_size, extra=meta)

    def on_iteration(iteration: int, stats: dict[str, float]) -> None:
        on_metrics(iteration + 1, {"iteration": iteration + 1, "reward": cfg.reward.name, **stats})
        done = iteration + 1
        if done % int(cfg.method.save_every) == 0 or done == iterations:
            save(done)

    candidates = 2 * settings.population if algorithm == "es" else settings.group_size
    log.info("%s %s on %s: %d iterations x %d inits x %d candidates, %d steps, reward %s -> %s",
             {"es": "ES", "latent": "latent GRPO"}.get(algorithm, "GRPO"), cfg.generator.name, cfg.task.name, iterations, batch, candidates,
             steps, cfg.reward.name, out_path)
    try:
        common = dict(layout=layout, make_inits=make_inits, reward_fn=reward_fn, settings=settings,
                      iterations=iterations, start_iteration=start, noise_seed=int(cfg.seed) * 100003,
                      on_iteration=on_iteration, log_every=int(cfg.method.log_every), progress=bool(cfg.progress))
        if algorithm == "es":
            es.train(policy, optimizer, **common)
        elif algorithm == "latent":
            latent.train(policy, optimizer, reference_mean=reference_mean, **common)
        else:
            grpo.train(policy, reference, optimizer, **common)
    finally:
        if writer is not None:
            writer.close()
    if not out_path.exists():  # the resume state was finished but its generator file was missing
        save(max(start, iterations))
    records = read_records(jsonl_path)
    plot_reward_curve(records, Path(cfg.paths.reports_dir) / f"{stem}-reward.png",
                      title=f"GRPO on {cfg.task.name}-{cfg.target.name}: {cfg.reward.name}")
    if records:
        eps = reward.evaluations_per_second
        print(f"grpo: {out_path} ({algorithm}, {records[-1]['iteration']} iterations, reward {records[0]['reward_mean']:.4f} -> "
              f"{records[-1]['reward_mean']:.4f}, {eps:.0f} candidate evaluations/s)")
    return out_path


def with_latent(loaded, latent_dim: int, steps: int, seed: int, layout, device: torch.device):
    """The policy of ``method.algorithm=latent``: ``loaded``'s generator as it is when it already has a latent of
    ``latent_dim``, else rebuilt with one (its weights copied, a fixed random projection, mean 0: the same
    networks as before until the mean moves). Returns (model, generator config to save)."""
    from synthnet.generators import build_generator
    from synthnet.methods.latent import attach_latent

    own = int(loaded.config.get("latent_dim", 0) or 0)
    model, config = loaded.model, loaded.config
    if own and own != latent_dim:
        raise SynthNetError(f"the source generator already has a latent of {own} dimensions, not "
                            f"method.latent_dim={latent_dim}; set method.latent_dim={own}")
    if not own and loaded.config.get("name") != "perceiver_moe":
        raise SynthNetError(f"method.algorithm=latent needs generator perceiver_moe (its conditioning takes the "
                            f"latent), not {loaded.config.get('name')}")
    if not own:
        config = {**loaded.config, "latent_dim": int(latent_dim)}
        model = build_generator(config, layout).to(device)
        missing, unexpected = model.load_state_dict(loaded.model.state_dict(), strict=False)
        if unexpected or set(missing) != {"latent_proj.weight", "latent_mean"}:
            raise SynthNetError(f"cannot add a latent to this generator (missing {missing}, unexpected {unexpected})")
        attach_latent(model, int(latent_dim), steps, seed)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name == "latent_mean")
    return model, config
