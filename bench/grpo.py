"""GRPO goal table: does reinforcement on the real score lift generated networks to SGD level
without losing novelty or diversity?

For each setting (digits-MLP, MNIST-1D MLP) this script, through the library and the same
config the CLI uses:

1. builds the zoo (``synthnet zoo``), then runs ``train_grpo`` for the ``val_accuracy`` and
   ``pruned_val_accuracy`` rewards; the first call trains the imitation generator first
   (the curriculum: imitation, then GRPO);
2. from held-out inits (``evaluate.first_seed`` onwards, never seen by zoo, GRPO or generate)
   generates networks deterministically with the imitation-only and the GRPO generators and
   trains SGD twins from the same inits with the zoo recipe
   (:func:`synthnet.evaluation.twins.train_twins`);
3. reports mean test accuracy per generation step, the best checkpoint in the zoo, novelty
   (distance / prediction disagreement to the nearest zoo final checkpoint, after neuron
   alignment) and diversity (pairwise prediction disagreement) as ratios to the twins'
   values, and magnitude-pruned test accuracy against pruned twins;
4. measures candidate evaluations per second of the reward, batched (vmap) vs a loop.

Usage: ``OMP_NUM_THREADS=1 .venv/bin/python bench/grpo.py [--quick] [--out bench/results/grpo] [key=value ...]``.
Writes ``<out>/grpo.md``, ``<out>/grpo.json`` and the reward curves ``<out>/*-reward.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import torch

from synthnet.config import compose, container
from synthnet.commands.artifacts import grpo_path, imitation_path, metrics_path, read_records
from synthnet.commands.train_grpo import train_grpo
from synthnet.errors import SynthNetError
from synthnet.evaluation.scoring import accuracy_and_loss, predictions, stack_state_dicts
from synthnet.generation import generate_networks, target_layout
from synthnet.generators import load_generator
from synthnet.methods.rewards import Reward, magnitude_prune
from synthnet.storage import load_state_dict, read_metadata
from synthnet.targets import init_state_dict
from synthnet.tasks import build_task
from synthnet.zoo import list_runs
from synthnet.zoo.training import Recipe

log = logging.getLogger("synthnet")

SETTINGS = {
    "digits-mlp": ["task=digits", "target=mlp", "target.hidden=[32]", "zoo.runs=32"],
    "mnist1d-mlp": ["experiment=mnist1d_mlp", "target.hidden=[64]", "zoo.epochs=20", "zoo.runs=32"],
}


def recipe_of(cfg) -> Recipe:
    return Recipe(epochs=cfg.zoo.epochs, batch_size=cfg.zoo.batch_size, optimizer=cfg.zoo.optimizer,
                  lr=float(cfg.zoo.lr), momentum=float(cfg.zoo.momentum), weight_decay=float(cfg.zoo.weight_decay),
                  checkpoint_every=cfg.zoo.checkpoint_every)


def zoo_finals(cfg, seeds=None) -> tuple[dict[str, torch.Tensor], float]:
    """Stacked final checkpoints of the zoo runs ``seeds`` (default all), and the best test
    accuracy of any of their checkpoints."""
    runs = list_runs(cfg.paths.checkpoints_dir)
    if seeds is not None:
        runs = {s: runs[s] for s in seeds if s in runs}
    finals = [load_state_dict(paths[-1])[0] for paths in runs.values()]
    best = max(float(read_metadata(p).get("test_accuracy", 0.0)) for paths in runs.values() for p in paths)
    return stack_state_dicts(finals), best


def novelty_and_diversity(model, specs, networks, zoo, task) -> dict[str, float]:
    """Nearest-zoo distance (aligned weights, relative) and disagreement, and pairwise disagreement."""
    from synthnet.evaluation.metrics import disagreement, distance_matrix, mean_off_diagonal

    x, _ = task.split("test")
    preds = predictions(model, networks, x)
    zoo_preds = predictions(model, zoo, x)
    return {"weight_novelty": float(distance_matrix(networks, zoo, specs).min(dim=1).values.mean()),
            "prediction_novelty": float(disagreement(preds, zoo_preds).min(dim=1).values.mean()),
            "diversity": mean_off_diagonal(disagreement(preds, preds))}


def scoring_speed(model, stacked_one: dict[str, torch.Tensor], task, sizes=(8, 32, 128), repeats=7) -> list[dict]:
    """Candidate evaluations per second of the val_accuracy reward, batched vs loop, at R candidates
    (best of ``repeats`` timings: the machine is shared, the fastest run is the least disturbed)."""
    rows = []
    for size in sizes:
        stacked = {k: v[:1].expand(size, *v.shape[1:]).contiguous() + 0.01 * torch.randn(size, *v.shape[1:])
                   for k, v in stacked_one.items()}
        row = {"candidates": size}
        for scoring in ("batched", "loop"):
            reward = Reward("val_accuracy", model, task.x_val, task.y_val, scoring=scoring)
            reward(stacked)  # warm-up
            best = float("inf")
            for _ in range(repeats):
                reward.evaluations, reward.seconds = 0, 0.0
                reward(stacked)
                best = min(best, reward.seconds)
            row[scoring] = size / best
        rows.append(row)
    return rows


def evaluate_setting(name: str, overrides: list[str], args) -> dict:
    cfg = compose(overrides + ["method=grpo"])
    task = build_task(container(cfg.task), cfg.paths.data_dir)
    start = time.perf_counter()
    from synthnet.config import COMMANDS
    import synthnet.commands  # noqa: F401

    COMMANDS["zoo"][0](cfg)
    zoo_seconds = time.perf_counter() - start
    trained = {}
    for reward in args.rewards:
        cfg_reward = compose(overrides + ["method=grpo", f"reward={reward}"])
        start = time.perf_counter()
        train_grpo(cfg_reward)
        trained[reward] = {"path": grpo_path(cfg_reward), "seconds": time.perf_counter() - start,
                           "records": read_records(metrics_path(grpo_path(cfg_reward)))}
        plot = Path(cfg_reward.paths.reports_dir) / f"{grpo_path(cfg_reward).stem}-reward.png"
        if plot.exists():
            shutil.copy(plot, Path(args.out) / f"{name}-{plot.name}")

    # held-out evaluation
    seeds = list(range(int(cfg.evaluate.first_seed), int(cfg.evaluate.first_seed) + args.count))
    steps = int(cfg.method.generation_steps or cfg.generate.steps)
    generators = {"imitation": imitation_path(cfg)}
    generators.update({f"grpo[{r}]": trained[r]["path"] for r in trained})
    loaded = {label: load_generator(path) for label, path in generators.items()}
    chunk = next(iter(loaded.values())).chunk_size
    model, layout = target_layout(container(cfg.target), task.input_shape, task.num_classes, chunk)
    specs = model.layer_specs()
    imitation_header = loaded["imitation"].metadata  # the runs the generator learned from are the novelty pool
    zoo_seeds = (imitation_header.get("train_seeds") or []) + (imitation_header.get("val_seeds") or []) or None
    zoo, best_zoo = zoo_finals(cfg, zoo_seeds)
    x_test, y_test = task.split("test")
    prune_fraction = float(compose(overrides + ["method=grpo", "reward=pruned_val_accuracy"]).reward.prune_fraction)

    from synthnet.evaluation.twins import train_twins

    inits = [init_state_dict(container(cfg.target), task.input_shape, task.num_classes, s) for s in seeds]
    twins = train_twins(model, inits, seeds, task, recipe_of(cfg))
    twin_nets = twins.final
    rows = []

    def describe(label, per_step_accuracy, networks, seconds):
        acc_pruned, _ = accuracy_and_loss(model, magnitude_prune(networks, prune_fraction, batch_dims=1), x_test, y_test)
        return {"label": label, "accuracy_per_step": per_step_accuracy,
                "test_accuracy": per_step_accuracy[-1], "pruned_test_accuracy": float(acc_pruned.mean()),
                "seconds": seconds, **novelty_and_diversity(model, specs, networks, zoo, task)}

    for label, generator in loaded.items():
        result = generate_networks(generator.model, layout, container(cfg.target), task.input_shape, task.num_classes,
                                   seeds, steps)
        per_step = [float(accuracy_and_loss(model, sd, x_test, y_test)[0].mean()) for sd in result.state_dicts]
        rows.append(describe(label, per_step, result.state_dicts[-1], result.seconds))
    twin_acc = float(accuracy_and_loss(model, twin_nets, x_test, y_test)[0].mean())
    twins_row = describe("SGD twins", [twin_acc], twin_nets, float(twins.seconds[-1].sum()))
    for row in rows + [twins_row]:
        for key in ("weight_novelty", "prediction_novelty", "diversity"):
            row[f"{key}_ratio"] = row[key] / twins_row[key] if twins_row[key] > 0 else float("nan")
    speed = scoring_speed(model, {k: v[:1] for k, v in zoo.items()}, task)
    return {"setting": name, "count": args.count, "steps": steps, "zoo_runs": next(iter(zoo.values())).shape[0],
            "best_zoo_checkpoint_test_accuracy": best_zoo, "zoo_seconds": zoo_seconds,
            "grpo": {r: {"seconds": t["seconds"], "iterations": len(t["records"]),
                         "reward_first": t["records"][0]["reward_mean"] if t["records"] else None,
                         "reward_last": t["records"][-1]["reward_mean"] if t["records"] else None,
                         "tie_fraction_mean": sum(x["tie_fraction"] for x in t["records"]) / max(len(t["records"]), 1),
                         "kl_last": t["records"][-1]["kl"] if t["records"] else None,
                         "clip_fraction_mean": sum(x["clip_fraction"] for x in t["records"]) / max(len(t["records"]), 1),
                         "seconds_per_iteration": sum(x["seconds"] for x in t["records"]) / max(len(t["records"]), 1)}
                     for r, t in trained.items()},
            "rows": rows + [twins_row], "prune_fraction": prune_fraction, "scoring_speed": speed}


def markdown(results: list[dict]) -> str:
    lines = []
    for res in results:
        lines += [f"### {res['setting']} ({res['count']} held-out inits, {res['steps']} generation steps, "
                  f"zoo of {res['zoo_runs']} runs; best zoo checkpoint test accuracy {res['best_zoo_checkpoint_test_accuracy']:.4f})",
                  "",
                  f"| networks | test acc per step | final test acc | pruned test acc (p={res['prune_fraction']}) "
                  f"| weight novelty (ratio to twins) | prediction novelty (ratio) | diversity (ratio) |",
                  "|---|---|---|---|---|---|---|"]
        for row in res["rows"]:
            per_step = " / ".join(f"{a:.3f}" for a in row["accuracy_per_step"])
            lines.append(f"| {row['label']} | {per_step} | {row['test_accuracy']:.4f} | {row['pruned_test_accuracy']:.4f} "
                         f"| {row['weight_novelty']:.3f} ({row['weight_novelty_ratio']:.2f}) "
                         f"| {row['prediction_novelty']:.3f} ({row['prediction_novelty_ratio']:.2f}) "
                         f"| {row['diversity']:.3f} ({row['diversity_ratio']:.2f}) |")
        lines += ["", "| GRPO reward | iterations | reward first -> last | tie fraction | final KL | clip fraction "
                  "| s/iteration | wall s of this call (imitation + GRPO when trained) |", "|---|---|---|---|---|---|---|---|"]
        for reward, g in res["grpo"].items():
            lines.append(f"| {reward} | {g['iterations']} | {g['reward_first']:.4f} -> {g['reward_last']:.4f} "
                         f"| {g['tie_fraction_mean']:.2f} | {g['kl_last']:.2e} | {g['clip_fraction_mean']:.3f} "
                         f"| {g['seconds_per_iteration']:.2f} | {g['seconds']:.0f} |")
        lines += ["", "| candidates | batched evals/s | loop evals/s |", "|---|---|---|"]
        for s in res["scoring_speed"]:
            lines.append(f"| {s['candidates']} | {s['batched']:.0f} | {s['loop']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/grpo")
    parser.add_argument("--root", default="runs/bench-grpo")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--rewards", default="val_accuracy,pruned_val_accuracy")
    parser.add_argument("--count", type=int, default=32, help="held-out inits")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of the script")
    parser.add_argument("overrides", nargs="*", help="extra config overrides for every setting")
    args = parser.parse_args()
    args.rewards = args.rewards.split(",")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.manual_seed(0)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    extra = [f"paths.root={args.root}", "progress=false", *args.overrides]
    if args.quick:
        extra += ["zoo.runs=4", "zoo.epochs=2", "method.iterations=2"]
        args.count = min(args.count, 4)
    results = []
    for name in args.settings.split(","):
        if name not in SETTINGS:
            raise SynthNetError(f"unknown bench setting '{name}'; available: {', '.join(SETTINGS)}")
        results.append(evaluate_setting(name, SETTINGS[name] + extra, args))
        text = markdown(results)
        (Path(args.out) / "grpo.md").write_text(text)
        (Path(args.out) / "grpo.json").write_text(json.dumps(results, indent=1, default=str))
        print(text)


if __name__ == "__main__":
    main()
