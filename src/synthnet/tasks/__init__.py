"""Tasks: datasets with fixed, seeded, disjoint train / validation / test splits.

A task knows nothing about architectures. Each entry of :data:`TASKS` is a function
``(config, data_dir) -> Task``; a new task is one entry here plus one YAML file in
``configs/task/``. Validation is carved from the training data and is what any
selection uses; the test split is for final reports only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

from synthnet.errors import SynthNetError
from synthnet.tasks.base import Task, carve_validation, make_task  # noqa: F401  (the public names)


def _digits(cfg: Mapping, data_dir: Path) -> Task:
    from synthnet.tasks.digits import load_digits_task
    return load_digits_task(cfg)


def _mnist1d(cfg: Mapping, data_dir: Path) -> Task:
    from synthnet.tasks.mnist1d import load_mnist1d_task
    return load_mnist1d_task(cfg)


def _mnist(cfg: Mapping, data_dir: Path) -> Task:
    from synthnet.tasks.mnist import load_mnist_task
    return load_mnist_task(cfg, data_dir)


TASKS: dict[str, Callable[[Mapping, Path], Task]] = {
    "digits": _digits,
    "mnist1d": _mnist1d,
    "mnist": _mnist,
}


def build_task(cfg: Mapping, data_dir: str | Path) -> Task:
    """Load the task named by ``cfg['name']``; ``data_dir`` holds files a task needs (MNIST)."""
    name = cfg["name"]
    if name not in TASKS:
        raise SynthNetError(f"unknown task '{name}'; available: {', '.join(sorted(TASKS))}")
    for key in ("test_fraction", "val_fraction"):
        value = cfg.get(key)
        if key in cfg and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1):
            raise SynthNetError(f"task.{key} must be a number in (0, 1), got {value!r}")
    for key in ("split_seed", "seed", "data_seed", "num_samples"):
        value = cfg.get(key)
        if key in cfg and value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise SynthNetError(f"task.{key} must be an integer >= 0, got {value!r}")
    try:
        return TASKS[name](cfg, Path(data_dir))
    except (TypeError, ValueError) as exc:  # another option of the wrong type or out of range
        options = {k: v for k, v in dict(cfg).items() if k != "name"}
        raise SynthNetError(f"task={name} cannot be built from task options {options} "
                            f"({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})") from None
