"""Generator quality on digits MLP: accuracy per generation step, novelty and diversity, beside SGD.

    OMP_NUM_THREADS=1 .venv/bin/python bench/generator_quality.py [--root /tmp/synthnet-bench] [--runs 256]

Builds the zoo (``synthnet zoo``), trains each generator with ``synthnet train`` (the
Perceiver and the flat baseline, each on one zoo run and on all of them), generates from
32 held-out inits (seeds 1000000.., never used by the zoo) with ``generate_networks`` and
trains SGD networks from the same 32 inits with the zoo's own recipe. Prints one table:
test accuracy after each of 4 steps (and of a single 1-step jump), the mean pairwise
cosine similarity among the 32 networks (diversity) and the mean over networks of the
largest cosine similarity to any zoo final checkpoint (novelty), all on the raw weights.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from synthnet.cli import main
from synthnet.config import compose, container
from synthnet.evaluation.scoring import accuracy_and_loss
from synthnet.generation import generate_networks, init_tokens, target_layout
from synthnet.generators import load_generator
from synthnet.methods.data import load_zoo_tokens
from synthnet.tasks import build_task
from synthnet.tokenization import detokenize
from synthnet.zoo.training import Recipe, train_runs


def flat(stacked: dict[str, torch.Tensor]) -> torch.Tensor:
    """{name: (B, *shape)} -> (B, parameters)."""
    return torch.cat([v.flatten(1) for v in stacked.values()], dim=1)


def similarity(networks: torch.Tensor, zoo_finals: torch.Tensor) -> tuple[float, float]:
    """(mean pairwise cosine among networks, mean over networks of max cosine to a zoo final)."""
    a = torch.nn.functional.normalize(networks, dim=1)
    b = torch.nn.functional.normalize(zoo_finals, dim=1)
    pairwise = a @ a.T
    off = ~torch.eye(len(a), dtype=torch.bool)
    return float(pairwise[off].mean()), float((a @ b.T).max(dim=1).values.mean())


def main_bench() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="/tmp/synthnet-bench")
    parser.add_argument("--runs", type=int, default=256, help="zoo runs")
    parser.add_argument("--count", type=int, default=32, help="held-out inits")
    parser.add_argument("--variants", default="perceiver_moe:all,perceiver_moe:1,flat_mlp:1,flat_mlp:all")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for `synthnet train`")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    common = [f"paths.root={args.root}", "progress=false"]
    assert main(["zoo", *common, f"zoo.runs={args.runs}", "zoo.group_size=32"]) == 0

    cfg = compose(common)
    task = build_task(container(cfg.task), cfg.paths.data_dir)
    target_config = container(cfg.target)
    template, layout = target_layout(target_config, task.input_shape, task.num_classes, 64)
    zoo = load_zoo_tokens(cfg.paths.checkpoints_dir, layout, template.layer_specs(), template.state_dict())
    zoo_finals = flat(detokenize(zoo.tokens[:, -1], layout))
    seeds = list(range(int(cfg.generate.first_seed), int(cfg.generate.first_seed) + args.count))
    x, y = task.x_test, task.y_test
    rows = []

    # SGD from the same held-out inits, with the zoo's recipe
    recipe = Recipe(epochs=cfg.zoo.epochs, batch_size=cfg.zoo.batch_size, optimizer=cfg.zoo.optimizer,
                    lr=float(cfg.zoo.lr))
    inits = detokenize(init_tokens(target_config, task.input_shape, task.num_classes, seeds, layout), layout)
    finals: dict[int, dict] = {}
    start = time.perf_counter()
    train_runs(template, [{k: v[i] for k, v in inits.items()} for i in range(len(seeds))], seeds, task, recipe,
               lambda c: finals.__setitem__(c.seed, c.state_dict))
    sgd = {k: torch.stack([finals[s][k] for s in seeds]) for k in inits}
    init_acc = float(accuracy_and_loss(template, inits, x, y)[0].mean())
    sgd_acc = accuracy_and_loss(template, sgd, x, y)[0]
    rows.append(("SGD (zoo recipe, 10 epochs)", "-", [init_acc] + [float("nan")] * 3 + [float(sgd_acc.mean())],
                 float("nan"), *similarity(flat(sgd), zoo_finals), time.perf_counter() - start))

    for variant in args.variants.split(","):
        name, runs = variant.split(":")
        output = Path(args.root) / "bench-generators" / f"{name}-{runs}.safetensors"
        train_args = [*common, f"generator={name}", f"train.output={output}", *args.overrides]
        if runs != "all":
            train_args += [f"method.runs={runs}", "method.val_runs=0"]
        start = time.perf_counter()
        assert main(["train", *train_args]) == 0
        seconds = time.perf_counter() - start
        model = load_generator(output).model
        four = generate_networks(model, layout, target_config, task.input_shape, task.num_classes, seeds, 4)
        one = generate_networks(model, layout, target_config, task.input_shape, task.num_classes, seeds, 1)
        per_step = [float(accuracy_and_loss(template, sd, x, y)[0].mean()) for sd in four.state_dicts]
        one_acc = float(accuracy_and_loss(template, one.state_dicts[-1], x, y)[0].mean())
        label = f"{name} ({'1 run' if runs == '1' else f'{zoo.num_runs} runs'})"
        rows.append((label, f"{four.state_dicts[-1]['layers.0.weight'].shape[0]}", per_step, one_acc,
                     *similarity(flat(four.state_dicts[-1]), zoo_finals), seconds))

    sgd_mean = float(sgd_acc.mean())
    print(f"\ndigits MLP 64-32-10, {args.count} held-out inits (seeds {seeds[0]}..{seeds[-1]}), zoo of {zoo.num_runs} "
          f"runs; test accuracy; cosines on raw weights")
    print("| networks | step 0 | step 1 | step 2 | step 3 | step 4 | 4-step / SGD | 1-step jump | "
          "pairwise cos | max cos to zoo final | train s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for label, _, steps, one_acc, pairwise, novelty, seconds in rows:
        cells = " | ".join("-" if v != v else f"{v:.3f}" for v in steps)
        ratio = steps[-1] / sgd_mean
        one = "-" if one_acc != one_acc else f"{one_acc:.3f}"
        print(f"| {label} | {cells} | {ratio:.2f} | {one} | {pairwise:.3f} | {novelty:.3f} | {seconds:.0f} |")


if __name__ == "__main__":
    main_bench()
