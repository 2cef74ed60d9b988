"""Zoo training speed: R runs trained as one vmapped group versus one run at a time.

    python bench/zoo_speed.py [--runs 16] [--epochs 10] [--threads N]

Both arms train the same seeds with the same recipe through the same code
(`synthnet.zoo.build_zoo`), differing only in `group_size`, and write real checkpoints
to a temporary folder. Prints a table: wall seconds, runs/s, speed-up, and the mean
final test accuracy of each arm (they must agree).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from synthnet.storage import read_metadata
from synthnet.tasks import build_task
from synthnet.targets import build_target
from synthnet.zoo import ZooSpec, build_zoo, checkpoint_path
from synthnet.zoo.training import Recipe, steps_per_epoch

CASES = {
    "digits-mlp": ({"name": "mlp", "hidden": [32], "activation": "relu"}, {"name": "digits"}, 32),
    "mnist1d-cnn": ({"name": "cnn", "channels": [64, 64, 64], "kernel_size": [5, 3, 3], "stride": 2, "padding": 1,
                     "pool": 0, "fc": [], "activation": "relu"}, {"name": "mnist1d"}, 100),
}


def run(case: str, runs: int, epochs: int, group_size: int) -> tuple[float, float]:
    target, task_cfg, batch = CASES[case]
    task = build_task(task_cfg, "unused")
    recipe = Recipe(epochs=epochs, batch_size=batch, lr=0.01)
    model = build_target(target, task.input_shape, task.num_classes)
    seeds = list(range(runs))
    with tempfile.TemporaryDirectory() as root:
        start = time.perf_counter()
        build_zoo(model=model, spec=ZooSpec(target, task_cfg, recipe), task=task, seeds=seeds,
                  checkpoints_dir=root, group_size=group_size, progress=False)
        seconds = time.perf_counter() - start
        final = epochs * steps_per_epoch(task, recipe)
        accuracy = sum(read_metadata(checkpoint_path(root, s, final))["test_accuracy"] for s in seeds) / runs
    return seconds, accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.runs} runs x {args.epochs} epochs, {args.threads} threads\n")
    print("| case | group_size | wall s | runs/s | speed-up | mean final test acc |")
    print("|---|---|---|---|---|---|")
    for case in CASES:
        base_seconds = None
        for group_size in (1, args.runs):
            seconds, accuracy = run(case, args.runs, args.epochs, group_size)
            base_seconds = base_seconds or seconds
            print(f"| {case} | {group_size} | {seconds:.2f} | {args.runs / seconds:.2f} | "
                  f"{base_seconds / seconds:.2f}x | {accuracy:.4f} |")


if __name__ == "__main__":
    main()
