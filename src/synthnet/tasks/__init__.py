"""Tasks: datasets with fixed, seeded, disjoint train / validation / test splits.

A task knows nothing about architectures. Each entry of :data:`TASKS` is its options class
(defaults, help and ranges, which the config schema ``configs/schema.py`` reads) and a loader
``(options, data_dir) -> Task``; a new task is one entry here. Validation is carved from the training data and is what any
selection uses; the test split is for final reports only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

from synthnet.errors import SynthNetError
from synthnet.options import build_options
from synthnet.tasks.base import Task, carve_validation, make_task  # noqa: F401  (the public names)
from synthnet.tasks.options import DigitsOptions, MNIST1DOptions, MNISTOptions


def _digits(options: DigitsOptions, data_dir: Path) -> Task:
    from synthnet.tasks.digits import load_digits_task
    return load_digits_task(options)


def _mnist1d(options: MNIST1DOptions, data_dir: Path) -> Task:
    from synthnet.tasks.mnist1d import load_mnist1d_task
    return load_mnist1d_task(options)


def _mnist(options: MNISTOptions, data_dir: Path) -> Task:
    from synthnet.tasks.mnist import load_mnist_task
    return load_mnist_task(options, data_dir)


TASKS: dict[str, tuple[type, Callable[[Any, Path], Task]]] = {
    "digits": (DigitsOptions, _digits),
    "mnist1d": (MNIST1DOptions, _mnist1d),
    "mnist": (MNISTOptions, _mnist),
}


def build_task(cfg: Mapping, data_dir: str | Path) -> Task:
    """Load the task named by ``cfg['name']`` (the other keys: its options class in :data:`TASKS`);
    ``data_dir`` holds files a task needs (MNIST)."""
    name = cfg["name"]
    if name not in TASKS:
        raise SynthNetError(f"unknown task '{name}'; available: {', '.join(sorted(TASKS))}")
    options_class, load = TASKS[name]
    try:
        options = build_options(options_class, cfg, "task.")
        return load(options, Path(data_dir))
    except (TypeError, ValueError) as exc:  # another option of the wrong type or out of range
        options = {k: v for k, v in dict(cfg).items() if k != "name"}
        raise SynthNetError(f"task={name} cannot be built from task options {options} "
                            f"({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})") from None
