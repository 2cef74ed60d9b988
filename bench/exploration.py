"""Exploration schemes of ``method=grpo`` on rewards no gradient reaches (issue 10's bench).

For each setting (digits MLP, MNIST-1D MLP) this script starts every scheme from the same
generator (the task-trained one of the main results table, ``runs/bench/<setting>/generators/
perceiver_moe-task.safetensors``; run ``bench/results_table.py`` first), tunes it with
``synthnet train method=grpo`` for each reward and scheme on the *same budget of reward
evaluations*, then evaluates every generator on 16 held-out inits (``evaluate.first_seed``
onwards, never seen in training or tuning), deterministically, as ``generate`` produces them:

* schemes: ``grpo`` (Gaussian noise on every step's weights, the old default), ``grpo-first``
  (noise on the first step only, the later steps deterministic), ``es`` (evolution strategies
  on the generator's parameters; antithetic, the same reward calls), ``latent`` (policy gradient
  over a 32-dimensional latent per network that shifts the generator's conditioning);
* rewards: validation accuracy after 90% global magnitude pruning, after int4 quantization, and
  plain validation accuracy;
* columns: the reward on the held-out inits before / after, test accuracy of the deterministic
  output (plain, 90% pruned, int4), reward evaluations used, CPU seconds of the tuning, fraction
  of tied groups (ES: tied antithetic pairs), final KL to the reference (GRPO: per weight;
  latent: of z, over its dimensions), the output
  drift (relative distance of the tuned networks to the start generator's, same inits), the
  diversity (pairwise test-prediction disagreement) and input sensitivity, each as a ratio to
  the start generator's; and the SGD twins of the same inits pruned / quantized post hoc.

Usage: ``.venv/bin/python bench/exploration.py [--settings digits-mlp mnist1d-mlp] [--schemes ...] [--iterations 100]``.
Writes ``<out>/<setting>.json`` and ``<out>/exploration.md`` (default ``bench/results/exploration``), whose
tables are every ``<out>/<setting>.json`` there, so ``--settings`` reruns one setting and keeps the others.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from synthnet.config import compose, container

SETTINGS = {
    "digits-mlp": ["target=mlp", "task=digits"],
    "mnist1d-mlp": ["experiment=mnist1d_mlp", "zoo.epochs=60"],
}
REWARDS = {
    "pruned90": ["reward=pruned_val_accuracy", "reward.prune_fraction=0.9"],
    "int4": ["reward=quantized_val_accuracy", "reward.bits=4"],
    "accuracy": ["reward=val_accuracy"],
}
# Each scheme spends 32 reward evaluations per iteration: GRPO and latent 4 inits x 8 candidates, ES 4 inits x 4
# antithetic pairs (8 candidates).
SCHEMES = {
    "grpo": ["method.algorithm=grpo", "method.noise_scale=0.05"],
    "grpo-first": ["method.algorithm=grpo", "method.noise_scale=[0.1,0,0,0]"],
    "es": ["method.algorithm=es", "method.population=4"],
    "latent": ["method.algorithm=latent", "method.group_size=8"],
}


def run(argv: list[str]) -> None:
    from synthnet.cli import main

    code = main(argv)
    if code != 0:
        raise SystemExit(f"exploration: `synthnet {' '.join(argv)}` failed with exit code {code}")


def held_out(cfg, setting: str, generators: dict[str, Path], count: int) -> dict:
    """Deterministic outputs of every generator on ``count`` held-out inits, and SGD twins of those inits."""
    from synthnet.evaluation import metrics
    from synthnet.evaluation.scoring import accuracy_and_loss, predictions
    from synthnet.evaluation.twins import train_twins
    from synthnet.generation import generate_networks, target_layout
    from synthnet.generators import load_generator
    from synthnet.methods.rewards import Reward, compress
    from synthnet.targets import init_state_dict
    from synthnet.tasks import build_task
    from synthnet.zoo.training import Recipe

    task = build_task(container(cfg.task), cfg.paths.data_dir)
    target = container(cfg.target)
    seeds = list(range(int(cfg.evaluate.first_seed), int(cfg.evaluate.first_seed) + count))
    x_test, y_test = task.split("test")
    rewards = {}
    for name, overrides in REWARDS.items():
        reward_cfg = container(compose(SETTINGS[setting] + overrides).reward)
        rewards[name] = Reward(reward_cfg.pop("name"), None, task.x_val, task.y_val, reward_cfg)
    rows, outputs = {}, {}
    model = specs = None
    for label, path in generators.items():
        generator = load_generator(path)
        model, layout = target_layout(target, task.input_shape, task.num_classes, generator.chunk_size,
                                      generator.bias_chunk)
        specs = model.layer_specs()
        networks = generate_networks(generator.model, layout, target, task.input_shape, task.num_classes, seeds,
                                     int(cfg.generate.steps)).state_dicts
        outputs[label] = networks[-1]
    names = [k for k, v in outputs[next(iter(outputs))].items() if v.dim() >= 3]

    def describe(final: dict) -> dict:
        row = {"test": float(accuracy_and_loss(model, final, x_test, y_test)[0].mean()),
               "test_pruned90": float(accuracy_and_loss(model, compress(final, 0.9, None, names), x_test,
                                                        y_test)[0].mean()),
               "test_int4": float(accuracy_and_loss(model, compress(final, None, 4, names), x_test, y_test)[0].mean())}
        for name, reward in rewards.items():
            reward.model = model
            row[f"reward_{name}"] = float(reward(final).mean())
        preds = predictions(model, final, x_test)
        row["diversity"] = metrics.mean_off_diagonal(metrics.disagreement(preds, preds))
        row["spread"] = metrics.pairwise_distance(final, specs)
        return row

    for label, final in outputs.items():
        rows[label] = describe(final)
        rows[label]["drift"] = float(metrics.relative_distance(final, outputs["start"]).mean())
    recipe = Recipe(**{f.name: cfg.zoo[f.name] for f in dataclasses.fields(Recipe)})  # as `synthnet zoo` builds it
    inits = [init_state_dict(target, task.input_shape, task.num_classes, s) for s in seeds]
    twins = train_twins(model, inits, seeds, task, recipe, keep_steps=[])
    rows["SGD twins"] = describe(twins.final)
    rows["SGD twins"]["drift"] = float("nan")
    for row in rows.values():
        row["input_sensitivity"] = row["spread"] / rows["SGD twins"]["spread"]
    return rows


def tune(setting: str, root: Path, source: Path, iterations: int, schemes: list[str], rewards: list[str],
         out_dir: Path) -> dict[str, dict]:
    """``synthnet train method=grpo`` for each (scheme, reward); returns their files and training records."""
    from synthnet.commands.artifacts import metrics_path, read_records

    tuned = {}
    for reward in rewards:
        for scheme in schemes:
            output = out_dir / setting / f"{scheme}-{reward}.safetensors"
            argv = ["train", *SETTINGS[setting], "method=grpo", *SCHEMES[scheme], *REWARDS[reward],
                    f"method.source={source}", f"method.iterations={iterations}", f"train.output={output}",
                    f"paths.root={root}", "progress=false", "method.log_every=10"]
            print("+ synthnet " + " ".join(argv), flush=True)
            cpu = time.process_time()
            run(argv)
            records = read_records(metrics_path(output))
            tuned[f"{scheme}[{reward}]"] = {
                "path": str(output), "scheme": scheme, "reward": reward, "iterations": len(records),
                "cpu_seconds": time.process_time() - cpu,  # this process, all threads: loading + tuning + saving
                "wall_seconds": sum(r["seconds"] for r in records),
                "evaluations": sum(int(r["evaluations"]) for r in records),
                "tie_fraction": sum(r["tie_fraction"] for r in records) / max(len(records), 1),
                "kl_last": records[-1].get("kl") if records else None,
                "train_reward_first": records[0]["reward_mean"] if records else None,
                "train_reward_last": sum(r["reward_mean"] for r in records[-10:]) / max(len(records[-10:]), 1)}
    return tuned


def markdown(setting: str, result: dict) -> str:
    rows, tuned = result["rows"], result["tuned"]
    start = rows["start"]
    lines = [f"### {setting}: from `{result['source']}`, {result['count']} held-out inits, {result['steps']} steps, "
             f"{result['iterations']} iterations per run", "",
             "| generator | reward (held-out val) before -> after | test acc | 90% pruned | int4 | evaluations | "
             "CPU s | tied groups | KL to ref | drift | diversity ratio | input sensitivity ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def line(label, row, reward=None, t=None):
        before_after = "" if reward is None else f"{start['reward_' + reward]:.3f} -> {row['reward_' + reward]:.3f}"
        extra = ["", "", "", "", f"{row['drift']:.3f}" if row["drift"] == row["drift"] else ""] if t is None else [
            str(t["evaluations"]), f"{t['cpu_seconds']:.0f}", f"{t['tie_fraction']:.2f}",
            "" if t["kl_last"] is None else f"{t['kl_last']:.2e}", f"{row['drift']:.3f}"]
        lines.append(f"| {label} | {before_after} | {row['test']:.3f} | {row['test_pruned90']:.3f} | "
                     f"{row['test_int4']:.3f} | " + " | ".join(extra) +
                     f" | {row['diversity'] / start['diversity']:.2f} | "
                     f"{row['input_sensitivity'] / start['input_sensitivity']:.2f} |")

    line("start (task generator)", start)
    for label, t in tuned.items():
        line(label, rows[label], t["reward"], t)
    line("SGD twins (post hoc)", rows["SGD twins"])
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=list(SCHEMES))
    parser.add_argument("--rewards", nargs="+", default=list(REWARDS), choices=list(REWARDS))
    parser.add_argument("--iterations", type=int, default=100, help="iterations of every run (32 reward calls each)")
    parser.add_argument("--count", type=int, default=16, help="held-out inits")
    parser.add_argument("--bench-root", type=Path, default=Path("runs/bench"),
                        help="where the results table's generators are (<root>/<setting>/generators)")
    parser.add_argument("--root", type=Path, default=Path("runs/exploration"), help="paths.root of the tuning runs")
    parser.add_argument("--out", type=Path, default=Path("bench/results/exploration"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import synthnet.commands  # noqa: F401  (registers the commands)

    for setting in args.settings:
        source = args.bench_root / setting / "generators" / "perceiver_moe-task.safetensors"
        if not source.is_file():
            raise SystemExit(f"exploration: {source} is missing; run bench/results_table.py first")
        root = args.root / setting
        tuned = tune(setting, root, source, args.iterations, args.schemes, args.rewards, args.root)
        cfg = compose(SETTINGS[setting] + [f"paths.root={root}"])
        rows = held_out(cfg, setting, {"start": source, **{k: Path(t["path"]) for k, t in tuned.items()}}, args.count)
        result = {"setting": setting, "source": str(source), "count": args.count, "steps": int(cfg.generate.steps),
                  "iterations": args.iterations, "tuned": tuned, "rows": rows}
        (args.out / f"{setting}.json").write_text(json.dumps(result, indent=1))
        print(markdown(setting, result), flush=True)
    # every setting measured into this folder, this call's and earlier calls' (--settings reruns one)
    sections = [markdown(s, json.loads((args.out / f"{s}.json").read_text())) for s in SETTINGS
                if (args.out / f"{s}.json").is_file()]
    (args.out / "exploration.md").write_text("\n\n".join(sections) + "\n")


if __name__ == "__main__":
    main()
