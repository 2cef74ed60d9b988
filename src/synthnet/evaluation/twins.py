"""SGD twins: the target trained with the zoo's own recipe from exactly the inits the
generator starts from. A twin is, by construction, as new as a fresh SGD run, so it is the
reference for accuracy, novelty, diversity and speed.

Timing: the trainer evaluates validation and test accuracy of all twins at every
checkpoint (that is how we learn *when* a twin reaches an accuracy). That evaluation is
inside the measured wall clock; :class:`Twins` keeps the gross time and a net time with
the measured cost of one evaluation subtracted per checkpoint, and the report says which
it uses (net).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import nn

from synthnet.evaluation.scoring import accuracy_and_loss, stack_state_dicts
from synthnet.tasks import Task
from synthnet.zoo.training import Checkpoint, Recipe, steps_per_epoch, train_runs


@dataclass
class Twins:
    """Twins of ``seeds``, trained together as one vmapped group.

    ``steps`` (C,), ``gross_seconds`` / ``net_seconds`` (C,) wall clock since the start at each
    checkpoint, ``test_accuracy`` (C, R). ``states`` keeps the stacked twins at the requested
    steps (always 0 and the final step).
    """

    seeds: list[int]
    final_step: int
    steps: torch.Tensor
    gross_seconds: torch.Tensor
    net_seconds: torch.Tensor
    test_accuracy: torch.Tensor
    states: dict[int, dict[str, torch.Tensor]] = field(repr=False)
    evaluation_seconds: float = 0.0  # measured cost of one checkpoint evaluation of the group

    @property
    def final(self) -> dict[str, torch.Tensor]:
        return self.states[self.final_step]

    def first_reaching(self, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Checkpoint index at which twin i first reaches test accuracy ``targets[i]``: (R,) int64
        and (R,) bool reached. Unreached twins get the last checkpoint."""
        reached_at = self.test_accuracy >= targets[None, :].to(self.test_accuracy)  # (C, R)
        reached = reached_at.any(0)
        last = torch.full(reached.shape, len(self.steps) - 1, dtype=torch.long)
        return torch.where(reached, reached_at.double().argmax(0), last), reached

    def time_to_reach(self, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Net seconds until twin i first reaches test accuracy ``targets[i]``; (R,) seconds and
        (R,) bool reached. Unreached twins get the full training time."""
        first, reached = self.first_reaching(targets)
        return self.net_seconds[first], reached

    def at_checkpoints(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """Twin i at checkpoint ``index[i]``, stacked (needs those steps kept)."""
        steps = [int(self.steps[j]) for j in index]
        missing = sorted(set(steps) - set(self.states))
        if missing:
            raise ValueError(f"twin states at step {missing[0]} were not kept (train_twins keep_steps=None keeps all)")
        return {name: torch.stack([self.states[step][name][i] for i, step in enumerate(steps)])
                for name in self.final}


def train_twins(model: nn.Module, inits: Sequence[Mapping[str, torch.Tensor]], seeds: Sequence[int], task: Task,
                recipe: Recipe, keep_steps: Sequence[int] | None = None) -> Twins:
    """Train one twin per (init, seed) with ``recipe`` and record accuracy and time at every checkpoint.

    The weights are kept at ``keep_steps`` (plus 0 and the final step); None keeps every checkpoint."""
    records: dict[int, dict] = {}
    final_step = int(recipe.epochs) * steps_per_epoch(task, recipe)
    keep = None if keep_steps is None else set(int(s) for s in keep_steps) | {0, final_step}
    position = {int(seed): i for i, seed in enumerate(seeds)}
    clock: dict[str, float] = {}

    def on_checkpoint(checkpoint: Checkpoint) -> None:
        record = records.get(checkpoint.step)
        if record is None:
            record = records[checkpoint.step] = {"seconds": time.perf_counter() - clock["start"],
                                                 "accuracy": [0.0] * len(seeds), "states": [None] * len(seeds)}
        i = position[checkpoint.seed]
        record["accuracy"][i] = checkpoint.test_accuracy
        if keep is None or checkpoint.step in keep:
            record["states"][i] = checkpoint.state_dict

    clock["start"] = time.perf_counter()
    train_runs(model, inits, list(seeds), task, recipe, on_checkpoint)
    steps = sorted(records)
    states = {step: stack_state_dicts(records[step]["states"]) for step in steps if keep is None or step in keep}
    evaluation_seconds = _evaluation_seconds(model, states[final_step], task)
    gross = torch.tensor([records[s]["seconds"] for s in steps], dtype=torch.float64)
    gross = gross - gross[0]  # the clock starts at the init's checkpoint: training time only
    net = (gross - evaluation_seconds * torch.arange(len(steps), dtype=torch.float64)).clamp_min(0.0)
    return Twins(seeds=[int(s) for s in seeds], final_step=final_step, steps=torch.tensor(steps),
                 gross_seconds=gross, net_seconds=net,
                 test_accuracy=torch.tensor([records[s]["accuracy"] for s in steps], dtype=torch.float64),
                 states=states, evaluation_seconds=evaluation_seconds)


def _evaluation_seconds(model: nn.Module, stacked: Mapping[str, torch.Tensor], task: Task, repeats: int = 3) -> float:
    """Median wall time of what the trainer does at each checkpoint: score the group on val and test."""
    device = next(model.parameters()).device
    stacked = {k: v.to(device) for k, v in stacked.items()}
    splits = [(task.x_val.to(device), task.y_val.to(device)), (task.x_test.to(device), task.y_test.to(device))]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for x, y in splits:
            accuracy_and_loss(model, stacked, x, y)
        times.append(time.perf_counter() - start)
    return float(sorted(times)[len(times) // 2])
