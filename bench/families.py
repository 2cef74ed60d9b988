"""Architecture families: one generator trained over many widths and depths, beside a generator trained on one
architecture with the same budget and beside SGD twins of every architecture, seen and unseen, in one table.

    python bench/families.py --setting digits-mlp [--steps 1500] [--count 16] [--root runs/families] [--depths 1 2 3]
                             [--generators family single curriculum] [--zoo-runs 1024]
                             [--depth-features relative role] [--override key=value ...]

Trains, through the CLI (``synthnet train method=task method.start=fresh``), a *family* generator
(``method.family_widths`` / ``method.family_depths`` of the setting) and a *single* generator on the setting's
own architecture, with the same steps and every other setting equal. Then, for each architecture of the
setting's list (its own, members of the family, a width inside the family's range but not in it, one outside it,
and a depth outside it), it generates ``--count`` networks from evaluation inits (seeds 2,000,000 on, never used
in training) with both generators, trains SGD twins from the same inits with the zoo's recipe (``zoo.*`` of the
setting) and prints, per architecture: seen or unseen by the family generator, test accuracy of its networks,
of the single generator's and of the twins, the ratio to the twins and the diversity ratio (mean pairwise
disagreement of test predictions, generated / twins). Selection inside training reads the validation split; the
test split only feeds this table.

The generator that transfers to unseen depths is trained with ``--override generator.set_rows=true
generator.row_mean_scaling=true`` (README, Families); without overrides both generators use the defaults.

``--generators ... curriculum`` adds (or runs alone) a generator over the same family trained the way the
results table trains one architecture: a zoo over the family (``zoo.family_*``, ``--zoo-runs`` runs with the
setting's recipe), imitation on it, then the task loss over the family from that imitation generator (anchored
to it), same task-loss steps.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

SETTINGS = {
    "digits-mlp": {
        "overrides": ["target=mlp", "task=digits"],
        "widths": [16, 24, 32, 48, 64], "depths": [1, 2],
        "architectures": [[32], [48], [32, 32], [40], [96], [40, 40, 40], [32, 32, 32]],
    },
    "mnist1d-mlp": {
        "overrides": ["experiment=mnist1d_mlp"],
        "widths": [64, 100, 128], "depths": [1, 2],
        "architectures": [[100, 100], [64], [80, 80], [160, 160], [100, 100, 100]],
    },
}


def run(argv: list[str]) -> None:
    from synthnet.cli import main

    print("+ synthnet " + " ".join(argv), flush=True)
    if main(argv) != 0:
        raise SystemExit(f"families: `synthnet {' '.join(argv)}` failed")


def main_bench(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", default="digits-mlp", choices=sorted(SETTINGS))
    parser.add_argument("--root", default=Path("runs/families"), type=Path)
    parser.add_argument("--steps", type=int, default=1500, help="task-loss steps of each generator")
    parser.add_argument("--count", type=int, default=16, help="networks (and twins) per architecture")
    parser.add_argument("--output", type=Path, default=None, help="also write the table and raw rows (JSON) here")
    parser.add_argument("--depths", type=int, nargs="+", default=None,
                        help="hidden-layer counts of the family (default: the setting's); deeper held-out "
                             "architectures are added to the table so one depth outside the family stays unseen")
    parser.add_argument("--generators", nargs="+", default=["family", "single"],
                        choices=["family", "single", "curriculum"],
                        help="family: task loss over the family from a fresh generator; single: the same on the "
                             "setting's own architecture; curriculum: zoo over the family -> imitation -> task loss")
    parser.add_argument("--zoo-runs", type=int, default=1024, help="runs of the curriculum's family zoo")
    parser.add_argument("--depth-features", nargs="+", default=[], choices=["relative", "role"],
                        help="also evaluate the family generator's weights under these generator.depth_feature "
                             "values (rows 'family-<value>'); trained on one or two hidden layers the two give the "
                             "same training, so this compares what each says about a deeper network")
    parser.add_argument("--override", nargs="*", default=[], help="extra key=value overrides of both trainings "
                                                                  "(e.g. generator.bias_chunk=true)")
    args = parser.parse_args(argv)

    from synthnet.config import compose, container
    from synthnet.evaluation.architectures import check_architectures, evaluate_architectures
    from synthnet.generators import load_generator
    from synthnet.tasks import build_task
    from synthnet.zoo.training import Recipe

    setting = dict(SETTINGS[args.setting])
    if args.depths:
        deepest = max(args.depths)
        width = setting["architectures"][0][0]
        extra = [[w] * (deepest + 1) for w in (width, 40 if width != 40 else 48)]
        setting.update(depths=sorted(args.depths),
                       architectures=setting["architectures"] + [a for a in extra if a not in setting["architectures"]])
    family = [f"method.family_widths=[{','.join(map(str, setting['widths']))}]",
              f"method.family_depths=[{','.join(map(str, setting['depths']))}]"]
    common = [*setting["overrides"], f"paths.root={args.root / args.setting}", "progress=false", "seed=0",
              "method=task", "method.start=fresh", "method.anchor_weight=0.01", f"method.steps={args.steps}",
              *args.override]
    files, seconds = {}, {}
    for name, extra in (("family", family), ("single", [])):
        if name not in args.generators:
            continue
        path = args.root / args.setting / f"{name}.safetensors"
        start = time.process_time()
        run(["train", *common, *extra, f"train.output={path}"])
        files[name], seconds[name] = path, time.process_time() - start
    if "curriculum" in args.generators:
        root = [*setting["overrides"], f"paths.root={args.root / args.setting}", "progress=false", "seed=0"]
        start = time.process_time()
        run(["zoo", *root, f"zoo.runs={args.zoo_runs}", *[f.replace("method.", "zoo.") for f in family]])
        seconds["curriculum zoo"] = time.process_time() - start
        path = args.root / args.setting / "curriculum.safetensors"
        start = time.process_time()
        run(["train", *root, "method=task", f"method.steps={args.steps}", *family, *args.override,
             f"train.output={path}"])
        files["curriculum"], seconds["curriculum (imitation + task)"] = path, time.process_time() - start

    cfg = compose(setting["overrides"])
    base, task_config = container(cfg.target), container(cfg.task)
    task = build_task(task_config, cfg.paths.data_dir)
    recipe = Recipe(**{key: cfg.zoo[key] for key in ("epochs", "batch_size", "optimizer", "lr", "momentum",
                                                     "weight_decay")})
    steps = int(cfg.generate.steps)
    # the evaluation of `synthnet evaluate evaluate.architectures=...` (no zoo here: no novelty column)
    generators = [(path, load_generator(path)) for path in files.values()]
    for feature in args.depth_features if "family" in files else []:
        loaded = generators[0][1]
        if feature == getattr(loaded.model, "depth_feature", "relative"):
            continue
        variant = copy.deepcopy(loaded)
        variant.model.depth_feature, variant.config = feature, {**loaded.config, "depth_feature": feature}
        name = f"family-{feature}"
        files[name] = files["family"].with_name(f"{name}.safetensors")  # a name for the rows; nothing is written
        generators.append((files[name], variant))
    configs, _ = check_architectures(setting["architectures"], base, task_config, task, generators)
    found = evaluate_architectures(configs=configs, task=task, generators=generators,
                                   seeds=list(range(2_000_000, 2_000_000 + args.count)), steps=steps, recipe=recipe,
                                   zoo_finals=None, zoo_model=None)
    names = list(files)
    rows = []
    for hidden in setting["architectures"]:
        by = {r["generator"]: r for r in found if r["target_config"]["hidden"] == list(hidden)}
        first = by[names[0]]
        row = {"architecture": first["architecture"], "seen": {n: by[n]["seen"] for n in names},
               "twin_accuracy": first["twin_accuracy"]}
        for n in names:  # the keys of the tables written before --generators: family_accuracy, ratio, ...
            prefix = "" if n == "family" else f"{n}_"
            row.update({f"{n}_accuracy": by[n]["generated_accuracy"], f"{prefix}ratio": by[n]["accuracy_ratio"],
                        f"{prefix}diversity_ratio": by[n]["diversity_ratio"]})
        rows.append(row)
        print(json.dumps(row), flush=True)
    kinds = {"family": "family", "single": "one architecture", "curriculum": "family zoo -> imitation -> task",
             **{f"family-{f}": f"the family's weights, generator.depth_feature={f}" for f in args.depth_features}}
    lines = [f"{args.setting}: family widths {setting['widths']} x depths {setting['depths']}, one architecture "
             f"{base['hidden']}; generators: " + "; ".join(f"{n} ({kinds[n]})" for n in names) +
             f"; {args.steps} task-loss steps each (family and single from a fresh generator"
             f"{f'; curriculum from the imitation of a {args.zoo_runs}-run family zoo' if 'curriculum' in names else ''})"
             f"; {args.count} evaluation inits, {steps} generation steps; test split", "",
             "| architecture | " + " | ".join(f"{n}: seen" for n in names if n != "single") + " | "
             + " | ".join(f"generated acc ({n})" for n in names) + " | SGD twins | "
             + " | ".join(f"ratio ({n})" for n in names) + " | "
             + " | ".join(f"diversity ratio ({n})" for n in names) + " |",
             "|---" * (2 + len([n for n in names if n != "single"]) + 3 * len(names)) + "|"]
    for r in rows:
        cells = [("seen" if r["seen"][n] else "unseen") for n in names if n != "single"]
        cells += [f"{r[f'{n}_accuracy']:.3f}" for n in names] + [f"{r['twin_accuracy']:.3f}"]
        cells += [f"{r['ratio' if n == 'family' else f'{n}_ratio']:.3f}" for n in names]
        cells += [f"{r['diversity_ratio' if n == 'family' else f'{n}_diversity_ratio']:.3f}" for n in names]
        lines.append(f"| {r['architecture']} | " + " | ".join(cells) + " |")
    lines += ["", "training CPU seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())]
    text = "\n".join(lines)
    print("\n" + text)
    if args.output:
        from synthnet.storage import atomic_write_bytes
        atomic_write_bytes(args.output, json.dumps({"table": text, "rows": rows, "steps": args.steps},
                                                   indent=1).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main_bench())
