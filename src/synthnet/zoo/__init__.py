"""The checkpoint zoo: many real training runs of one target on one task, every checkpoint kept.

Layout (one folder per target on a task; ``generated/`` sits beside ``checkpoints/``)::

    <target_dir>/checkpoints/seed_000003/step_0000000.safetensors   # the random init
    <target_dir>/checkpoints/seed_000003/step_0000040.safetensors   # after epoch 1, ...

Each file's header holds the target name and config, the task, the seed, the step and
epoch, the train loss, validation loss and accuracy, test loss and accuracy, the recipe
and the package version. A run counts as complete when its final checkpoint exists with
the same target, task and recipe; re-running skips it.

A zoo over a **family of architectures** (``zoo.family_widths`` / ``zoo.family_depths``) lives in
the same folder: each run's architecture is the family member its seed picks
(:func:`synthnet.targets.family_member`), its header's ``target_config`` is that member's, and
``family`` records the base config and the widths and depths drawn from.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from torch import nn
from tqdm.auto import tqdm

from synthnet import __version__
from synthnet.errors import SynthNetError
from synthnet.storage import read_metadata, save_state_dict
from synthnet.tasks import Task
from synthnet.targets import build_target, family_member, init_state_dict
from synthnet.zoo.training import Checkpoint, Recipe, steps_per_epoch, train_runs

_STEP_FILE = re.compile(r"step_(\d+)\.safetensors$")
_RUN_DIR = re.compile(r"seed_(\d+)$")


def checkpoint_path(checkpoints_dir: str | Path, seed: int, step: int) -> Path:
    return Path(checkpoints_dir) / f"seed_{int(seed):06d}" / f"step_{int(step):07d}.safetensors"


def list_runs(checkpoints_dir: str | Path) -> dict[int, list[Path]]:
    """``{seed: [checkpoint paths ordered by step]}`` for every run folder under ``checkpoints_dir``."""
    runs: dict[int, list[Path]] = {}
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return runs
    for run_dir in sorted(root.iterdir()):
        match = _RUN_DIR.match(run_dir.name)
        if not match or not run_dir.is_dir():
            continue
        files = [p for p in run_dir.iterdir() if _STEP_FILE.match(p.name)]
        files.sort(key=lambda p: int(_STEP_FILE.match(p.name).group(1)))
        if files:
            runs[int(match.group(1))] = files
    return runs


def step_of(path: Path) -> int:
    return int(_STEP_FILE.match(Path(path).name).group(1))


@dataclass(frozen=True)
class ZooSpec:
    """Everything that decides a zoo's contents, stored in every header and checked on reuse."""

    target_config: dict
    task_config: dict
    recipe: Recipe
    family_widths: tuple[int, ...] = ()  # a family zoo: each run's widths drawn from these by its seed
    family_depths: tuple[int, ...] = ()  # ... and its number of layers from these

    @property
    def is_family(self) -> bool:
        return bool(self.family_widths or self.family_depths)

    def run_target(self, seed: int) -> dict:
        """The target config of run ``seed``: the target itself, or the family member its seed picks."""
        if not self.is_family:
            return self.target_config
        return family_member(self.target_config, self.family_widths, self.family_depths, int(seed))

    def provenance(self, seed: int | None = None) -> dict[str, Any]:
        out = {"target": self.target_config["name"],
               "target_config": self.target_config if seed is None else self.run_target(seed),
               "task": self.task_config["name"], "task_config": self.task_config, "recipe": asdict(self.recipe)}
        if self.is_family:
            out["family"] = {"base": self.target_config, "widths": list(self.family_widths),
                             "depths": list(self.family_depths)}
        return out


MAX_HEADER_EPOCHS = 10_000  # a recipe read from a header beyond this is refused, not trusted


def _number(metadata: Mapping[str, Any], key: str, path: Path, low: float, high: float) -> float:
    value = metadata.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise SynthNetError(f"{path}: checkpoint header key '{key}' must be a number in [{low:g}, {high:g}], "
                            f"got {value!r}")
    return value


def checkpoint_header(path: str | Path, metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A zoo checkpoint's header, validated: ``step`` (an integer >= 0, the one in the file name),
    ``final`` (a bool), ``val_accuracy`` / ``test_accuracy`` (in [0, 1]), ``target_config`` and
    ``task_config`` (configs with a name) and ``recipe`` (a :class:`Recipe`, epochs bounded).
    Headers are untrusted input: anything else is a one-line error naming the file and key."""
    path = Path(path)
    metadata = dict(read_metadata(path) if metadata is None else metadata)
    step = metadata.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise SynthNetError(f"{path}: checkpoint header key 'step' must be an integer >= 0, got {step!r}")
    match = _STEP_FILE.match(path.name)
    if match and int(match.group(1)) != step:
        raise SynthNetError(f"{path}: header says step {step}, the file name says {int(match.group(1))}")
    if not isinstance(metadata.get("final", False), bool):
        raise SynthNetError(f"{path}: checkpoint header key 'final' must be true or false")
    for key in ("val_accuracy", "test_accuracy"):
        _number(metadata, key, path, 0.0, 1.0)
    for key in ("target_config", "task_config"):
        if not isinstance(metadata.get(key), dict) or not isinstance(metadata[key].get("name"), str):
            raise SynthNetError(f"{path}: checkpoint header key '{key}' must be a config with a name")
    metadata["recipe"] = recipe_from_header(metadata.get("recipe"), path)
    return metadata


def recipe_from_header(recipe: Any, path: str | Path) -> dict[str, Any]:
    """The zoo recipe a header records, checked like a config: known fields, valid values, bounded epochs."""
    from dataclasses import fields

    if not isinstance(recipe, dict):
        raise SynthNetError(f"{path}: checkpoint header key 'recipe' must be a mapping, got {type(recipe).__name__}")
    known = {f.name for f in fields(Recipe)}
    unknown = sorted(set(recipe) - known)
    if unknown:
        raise SynthNetError(f"{path}: unknown recipe field {unknown[0]!r} in its header (known: {', '.join(sorted(known))})")
    missing = sorted(known - set(recipe) - {"checkpoint_every"})
    if missing:
        raise SynthNetError(f"{path}: its header's recipe lacks {missing[0]!r}; the twins could not train as the zoo did")
    for key in ("epochs", "batch_size"):
        value = recipe.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int):
            raise SynthNetError(f"{path}: recipe '{key}' must be an integer, got {value!r}")
    for key in ("lr", "momentum", "weight_decay"):
        value = recipe.get(key, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or abs(value) > 1e6:
            raise SynthNetError(f"{path}: recipe '{key}' must be a finite number, got {value!r}")
    if int(recipe.get("epochs", 1)) > MAX_HEADER_EPOCHS:
        raise SynthNetError(f"{path}: recipe epochs {recipe['epochs']} is over {MAX_HEADER_EPOCHS}; "
                            f"not trusted from a header (the twins would train that long)")
    every = recipe.get("checkpoint_every")
    if every is not None and (isinstance(every, bool) or not isinstance(every, int)):
        raise SynthNetError(f"{path}: recipe 'checkpoint_every' must be an integer or null, got {every!r}")
    if not isinstance(recipe.get("optimizer"), str):
        raise SynthNetError(f"{path}: recipe 'optimizer' must be a name, got {recipe.get('optimizer')!r}")
    Recipe(**recipe)  # the remaining checks (positive values, known optimizer)
    return dict(recipe)


def _matches(metadata: Mapping[str, Any], spec: ZooSpec, seed: int) -> bool:
    wanted = spec.provenance(seed)
    return all(metadata.get(key) == value for key, value in wanted.items()) and \
        ("family" in metadata) == spec.is_family


def completed_seeds(checkpoints_dir: str | Path, seeds: Sequence[int], spec: ZooSpec, final_step: int) -> list[int]:
    """Seeds whose run is complete and intact: the final checkpoint exists, and every checkpoint of the
    run opens as a whole safetensors file (header read, length checked against it by the reader; no
    tensor is loaded). A damaged run is left out, so the zoo trains it again. A final checkpoint from
    another config, or with a header that does not validate, is an error."""
    import logging

    runs = list_runs(checkpoints_dir)
    done = []
    for seed in seeds:
        path = checkpoint_path(checkpoints_dir, seed, final_step)
        if not path.exists():
            continue
        try:  # cut short by a killed write: ours to redo
            for file in runs.get(int(seed), [path]):
                read_metadata(file)
        except SynthNetError as exc:
            logging.getLogger("synthnet").warning("zoo run %d is damaged (%s); training it again", seed, exc)
            continue
        metadata = checkpoint_header(path)  # a whole file with a bad header is refused, never overwritten
        if not _matches(metadata, spec, seed):
            raise SynthNetError(f"{path} was made with a different target, task, recipe or family; "
                                f"choose another paths.root or remove {Path(checkpoints_dir)}")
        if runs.get(int(seed), [None])[0] is None or step_of(runs[int(seed)][0]) != 0:
            logging.getLogger("synthnet").warning("zoo run %d has no step-0 checkpoint; training it again", seed)
            continue
        done.append(seed)
    return done


def default_group_size(model: nn.Module) -> int:
    """Runs per vmapped group when ``zoo.group_size`` is null. ``bench/zoo_speed.py`` measured
    (16 runs, 1 thread): digits MLP 13x faster in one group; MNIST-1D CNN 0.6x (vmapped
    convolutions are slower than a loop), so convolutional targets train one run at a time."""
    return 1 if any(spec.kind.startswith("conv") for spec in model.layer_specs()) else 8


def build_zoo(*, model: nn.Module, spec: ZooSpec, task: Task, seeds: Sequence[int], checkpoints_dir: str | Path,
              group_size: int = 8, rank: int = 0, world_size: int = 1, progress: bool = True) -> dict[str, Any]:
    """Train the missing runs among ``seeds`` (this rank's share) and write their checkpoints.

    Runs are trained ``group_size`` at a time (one vmapped computation per group; in a family zoo
    a group holds runs of one architecture, ``model`` being the target's own). Groups are fixed by
    the seed list alone and dealt round-robin to ranks, so one process and several write the same
    files. Returns ``{"trained": [...], "skipped": [...], "seconds": s}``.
    """
    recipe = spec.recipe
    final_step = int(recipe.epochs) * steps_per_epoch(task, recipe)
    skipped = completed_seeds(checkpoints_dir, seeds, spec, final_step)
    todo = [int(s) for s in seeds if int(s) not in set(skipped)]
    by_architecture: dict[str, list[int]] = {}
    for seed in todo:  # first-seen order: the groups depend on the seed list alone
        by_architecture.setdefault(repr(sorted(spec.run_target(seed).items())), []).append(seed)
    groups = [same[i:i + group_size] for same in by_architecture.values() for i in range(0, len(same), group_size)]
    mine = [g for i, g in enumerate(groups) if i % world_size == rank]
    start = time.perf_counter()
    bar = tqdm(total=sum(len(g) for g in mine), desc="zoo runs", disable=not progress, leave=False,
               bar_format="{l_bar}{bar}| {n:.1f}/{total} runs [{elapsed}<{remaining}{postfix}]")

    def save(checkpoint: Checkpoint) -> None:
        metadata = {**spec.provenance(checkpoint.seed), "seed": checkpoint.seed, "step": checkpoint.step, "epoch": checkpoint.epoch,
                    "final": checkpoint.step == final_step, "final_step": final_step,
                    "train_loss": checkpoint.train_loss, "val_loss": checkpoint.val_loss,
                    "val_accuracy": checkpoint.val_accuracy, "test_loss": checkpoint.test_loss,
                    "test_accuracy": checkpoint.test_accuracy, "synthnet_version": __version__}
        save_state_dict(checkpoint_path(checkpoints_dir, checkpoint.seed, checkpoint.step), checkpoint.state_dict,
                        metadata)

    device = next(model.parameters()).device
    for group in mine:
        config = spec.run_target(group[0])
        group_model = model if config == spec.target_config else \
            build_target(config, task.input_shape, task.num_classes).to(device)
        inits = [init_state_dict(config, task.input_shape, task.num_classes, seed) for seed in group]
        bar.set_postfix(seeds=f"{group[0]}..{group[-1]}")
        train_runs(group_model, inits, group, task, recipe, save,
                   on_epoch=lambda epoch, n=len(group): bar.update(n / recipe.epochs))
    bar.close()
    return {"trained": [s for g in mine for s in g], "skipped": skipped, "seconds": time.perf_counter() - start}


def summarize(checkpoints_dir: str | Path, seeds: Sequence[int], final_step: int) -> dict[str, Any]:
    """Statistics over the final checkpoints of ``seeds`` (read from headers only)."""
    runs = list_runs(checkpoints_dir)
    finals = [read_metadata(checkpoint_path(checkpoints_dir, s, final_step)) for s in seeds]
    out: dict[str, Any] = {"runs": len(finals), "checkpoints": sum(len(runs.get(int(s), [])) for s in seeds)}
    for key in ("val_accuracy", "test_accuracy"):
        values = np.array([m[key] for m in finals], dtype=float)
        out[key] = {"mean": float(values.mean()), "std": float(values.std()),
                    "min": float(values.min()), "max": float(values.max())}
    return out


def format_summary(summary: Mapping[str, Any], seconds: float) -> str:
    rows = [("runs", f"{summary['runs']}"), ("checkpoints", f"{summary['checkpoints']}")]
    for key, label in (("val_accuracy", "final val accuracy"), ("test_accuracy", "final test accuracy")):
        s = summary[key]
        rows.append((label, f"mean {s['mean']:.4f}  std {s['std']:.4f}  min {s['min']:.4f}  max {s['max']:.4f}"))
    rows.append(("wall seconds", f"{seconds:.1f}"))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"| {k.ljust(width)} | {v} |" for k, v in rows)
