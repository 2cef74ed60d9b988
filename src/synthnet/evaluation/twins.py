"""SGD twins: the target trained with the zoo's own recipe from exactly the inits the
generator starts from. A twin is, by construction, as new as a fresh SGD run, so it is the
reference for accuracy, novelty, diversity and speed.

Twins are trained the way the zoo trains that target (:func:`synthnet.zoo.default_group_size`:
vmapped groups for MLPs, one run at a time for CNNs, where vmapped convolutions are slower).
Timing: the clock starts with the inits in hand and stops with the weights in hand; the
trainer scores every checkpoint (that is how we learn *when* a twin reaches an accuracy), and
that scoring is measured and left out (:attr:`synthnet.zoo.training.Checkpoint.train_seconds`).
A group's time is shared by its members: ``seconds`` is per network, like generation's.

Choices use validation accuracy only: "the checkpoint where SGD first reaches a network's
accuracy" compares validation accuracies; test accuracy is recorded for the report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import nn

from synthnet import distributed
from synthnet.evaluation.scoring import stack_state_dicts
from synthnet.tasks import Task
from synthnet.zoo.training import Checkpoint, Recipe, steps_per_epoch, train_runs


@dataclass
class Twins:
    """Twins of ``seeds``. ``steps`` (C,) checkpoint steps; ``seconds`` (C, R) training seconds per
    network up to each checkpoint (its group's time / group size); ``val_accuracy`` and
    ``test_accuracy`` (C, R). ``states`` keeps the stacked twins at the requested steps (always 0
    and the final step)."""

    seeds: list[int]
    final_step: int
    steps: torch.Tensor
    seconds: torch.Tensor
    val_accuracy: torch.Tensor
    test_accuracy: torch.Tensor
    states: dict[int, dict[str, torch.Tensor]] = field(repr=False)
    group_size: int = 1  # runs per vmapped group, as the zoo trains this target

    @property
    def final(self) -> dict[str, torch.Tensor]:
        return self.states[self.final_step]

    def first_reaching(self, val_targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Checkpoint index at which twin i first reaches *validation* accuracy ``val_targets[i]``:
        (R,) int64 and (R,) bool reached. Unreached twins get the last checkpoint."""
        reached_at = self.val_accuracy >= val_targets[None, :].to(self.val_accuracy) - 1e-9  # (C, R)
        reached = reached_at.any(0)
        last = torch.full(reached.shape, len(self.steps) - 1, dtype=torch.long)
        return torch.where(reached, reached_at.double().argmax(0), last), reached

    def time_to_reach(self, val_targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training seconds per network until twin i first reaches validation accuracy
        ``val_targets[i]``; (R,) seconds and (R,) bool reached. Unreached twins get the full time."""
        first, reached = self.first_reaching(val_targets)
        return self.seconds[first, torch.arange(len(first))], reached

    def curve_reaching(self, val_target: float) -> tuple[int, bool]:
        """First checkpoint at which the twins' *mean* validation accuracy reaches ``val_target``
        (the last one if never): where SGD stands at a row's accuracy."""
        reached = (self.val_accuracy.mean(1) >= float(val_target) - 1e-9).nonzero()
        return (int(reached[0, 0]), True) if len(reached) else (len(self.steps) - 1, False)

    def at_checkpoints(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """Twin i at checkpoint ``index[i]``, stacked (needs those steps kept)."""
        steps = [int(self.steps[j]) for j in index]
        missing = sorted(set(steps) - set(self.states))
        if missing:
            raise ValueError(f"twin states at step {missing[0]} were not kept (train_twins keep_steps=None keeps all)")
        return {name: torch.stack([self.states[step][name][i] for i, step in enumerate(steps)])
                for name in self.final}


def train_twins(model: nn.Module, inits: Sequence[Mapping[str, torch.Tensor]], seeds: Sequence[int], task: Task,
                recipe: Recipe, keep_steps: Sequence[int] | None = None, group_size: int | None = None) -> Twins:
    """Train one twin per (init, seed) with ``recipe``, ``group_size`` runs at a time (None: as the
    zoo trains this target), recording accuracy and training time at every checkpoint.

    The weights are kept at ``keep_steps`` (plus 0 and the final step); None keeps every checkpoint.
    Under torchrun each process trains twins ``rank, rank + W, ...`` and every process returns all of
    them (its seconds are its own process's clock)."""
    from synthnet.zoo import default_group_size

    group_size = int(group_size or default_group_size(model))
    final_step = int(recipe.epochs) * steps_per_epoch(task, recipe)
    keep = None if keep_steps is None else set(int(s) for s in keep_steps) | {0, final_step}
    position = {int(seed): i for i, seed in enumerate(seeds)}
    runs = len(seeds)
    records: dict[int, dict] = {}
    members: dict[int, int] = {}  # twin -> size of its group

    def on_checkpoint(checkpoint: Checkpoint) -> None:
        record = records.setdefault(checkpoint.step, {"seconds": [0.0] * runs, "val": [0.0] * runs,
                                                      "test": [0.0] * runs, "states": [None] * runs})
        i = position[checkpoint.seed]
        record["seconds"][i] = checkpoint.train_seconds / members[i]
        record["val"][i], record["test"][i] = checkpoint.val_accuracy, checkpoint.test_accuracy
        if keep is None or checkpoint.step in keep:
            record["states"][i] = checkpoint.state_dict

    mine = distributed.share(list(range(runs)))  # under torchrun: this process's twins, in groups of its own
    for start in range(0, len(mine), group_size):
        group = mine[start:start + group_size]
        members.update({i: len(group) for i in group})
        train_runs(model, [inits[i] for i in group], [int(seeds[i]) for i in group], task, recipe, on_checkpoint)
    steps = sorted(records)
    zeros = {name: torch.zeros_like(tensor) for name, tensor in inits[0].items()}  # other processes' twins
    states = {step: {name: distributed.all_sum(tensor) for name, tensor in stack_state_dicts(
        [s if s is not None else zeros for s in records[step]["states"]]).items()}
        for step in steps if keep is None or step in keep}
    table = lambda key: distributed.all_sum(  # noqa: E731
        torch.tensor([records[s][key] for s in steps], dtype=torch.float64))
    return Twins(seeds=[int(s) for s in seeds], final_step=final_step, steps=torch.tensor(steps),
                 seconds=table("seconds"), val_accuracy=table("val"), test_accuracy=table("test"), states=states,
                 group_size=group_size)
