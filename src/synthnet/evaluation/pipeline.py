"""The evaluation that cannot be fooled: generated networks beside their SGD twins, the zoo
and the trivial baselines, on the same axes, in one run.

Every choice reads the validation split: which twin checkpoint matches a generated network's
accuracy, where SGD stands at a baseline's accuracy, which zoo final a baseline copies.

:func:`evaluate` takes already-built objects (the target, the task, the zoo's final
checkpoints, the twins, generated networks per step, the baselines) and returns one
JSON-ready dict with every number; :mod:`synthnet.evaluation.report` turns it into markdown
and plots. Test-split numbers are only reported; nothing here selects on them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from synthnet.evaluation import metrics
from synthnet.evaluation.baselines import Baseline
from synthnet.evaluation.scoring import accuracy_and_loss, predictions
from synthnet.evaluation.twins import Twins
from synthnet.methods.rewards import magnitude_prune, quantize
from synthnet.targets import LayerSpec
from synthnet.tasks import Task


@dataclass
class ZooFinals:
    """The zoo as evaluation sees it: finals (Z, *shape) and the pool for weight-space novelty."""

    seeds: list[int]
    finals: dict[str, torch.Tensor] = field(repr=False)
    val_accuracy: list[float]
    pool: dict[str, torch.Tensor] = field(repr=False)  # (P, *shape): finals, or every checkpoint
    pool_name: str = "final checkpoints"
    pool_seeds: list[int] | None = None  # run of each pool member; None = the pool is ``finals``

    def pool_runs(self) -> list[int]:
        return list(self.seeds) if self.pool_seeds is None else list(self.pool_seeds)


@dataclass
class Generated:
    """Networks of one generator from the twins' inits: ``states[k]`` stacked after k steps."""

    name: str
    states: list[dict[str, torch.Tensor]] = field(repr=False)
    seconds: float  # wall time to generate all of them (same run as the twins)
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Options:
    insensitive_below: float = 0.1  # input-sensitivity ratio under which a generator is flagged
    collapse_below: float = 1.0  # flag as collapsed when input sensitivity AND diversity ratios are below this
    prune_fractions: tuple[float, ...] = (0.5, 0.8, 0.9)
    quantize_bits: tuple[int, ...] = (8, 4)
    keep_matrices: bool = True  # IoU matrices in the result (for plots)
    zoo_rows: int = 64  # zoo finals scored against the rest of the zoo for the zoo-vs-zoo row


class _Scorer:
    """Scores stacks of networks against the zoo on the test split (and val for the record)."""

    def __init__(self, model: nn.Module, specs: Sequence[LayerSpec], task: Task, zoo: ZooFinals):
        self.model, self.specs, self.task, self.zoo = model, list(specs), task, zoo
        self.device = next(model.parameters()).device
        self.x_test, self.y_test = task.x_test.to(self.device), task.y_test.to(self.device)
        self.x_val, self.y_val = task.x_val.to(self.device), task.y_val.to(self.device)
        self.zoo_errors = self.errors(zoo.finals)

    def to_device(self, stacked):
        return {k: v.to(self.device) for k, v in stacked.items()}

    def accuracy(self, stacked, split: str = "test") -> torch.Tensor:
        x, y = (self.x_test, self.y_test) if split == "test" else (self.x_val, self.y_val)
        return accuracy_and_loss(self.model, self.to_device(stacked), x, y)[0].double().cpu()

    def predictions(self, stacked) -> torch.Tensor:
        return predictions(self.model, self.to_device(stacked), self.x_test).cpu()

    def errors(self, stacked) -> torch.Tensor:
        return metrics.error_sets(self.predictions(stacked), self.y_test.cpu())

    def score(self, stacked, *, zoo_members: int | None = None) -> dict[str, Any]:
        """Accuracy, behavioural and weight-space novelty, diversity, spread of one stack.

        ``zoo_members=K``: the stack is the first K zoo finals, each scored against the *other* runs."""
        stacked = {k: v.detach().cpu() for k, v in stacked.items()}
        test, val = self.accuracy(stacked), self.accuracy(stacked, "val")
        predicted = self.predictions(stacked)  # (R, N)
        errors = metrics.error_sets(predicted, self.y_test.cpu())  # (R, N)
        iou_zoo = metrics.error_set_iou(errors, self.zoo_errors)  # (R, Z)
        distance = metrics.distance_matrix(stacked, self.zoo.pool, self.specs)  # (R, P)
        unaligned = metrics.distance_matrix(stacked, self.zoo.pool, self.specs, aligned=False)
        if zoo_members is not None:  # a zoo final against the *other* runs (leave its own run out)
            iou_zoo = iou_zoo.masked_fill(torch.eye(zoo_members, len(self.zoo.seeds), dtype=torch.bool), float("-inf"))
            same_run = (torch.tensor(self.zoo.seeds[:zoo_members])[:, None]
                        == torch.tensor(self.zoo.pool_runs())[None, :])
            distance, unaligned = distance.masked_fill(same_run, math.inf), unaligned.masked_fill(same_run, math.inf)
        iou_self = metrics.error_set_iou(errors, errors)
        out = {
            "count": metrics.count(stacked),
            "test_accuracy": metrics.summary(test), "val_accuracy": metrics.summary(val),
            "max_iou_vs_zoo": metrics.summary(iou_zoo.max(1).values),
            "nearest_zoo_distance_aligned": metrics.summary(distance.min(1).values),
            "nearest_zoo_distance_unaligned": metrics.summary(unaligned.min(1).values),
            "pairwise_iou": metrics.mean_off_diagonal(iou_self),
            "diversity_disagreement": metrics.mean_off_diagonal(metrics.disagreement(predicted, predicted)),
            "pairwise_distance_aligned": metrics.pairwise_distance(stacked, self.specs),
            "per_network_test_accuracy": test.tolist(),
        }
        out["_matrices"] = {"self": iou_self, "vs_zoo": iou_zoo}
        return out


def _matched_novelty(scorer: _Scorer, stacked, steps: torch.Tensor) -> dict[str, Any]:
    """Accuracy and novelty of twins taken at the checkpoint where each matches a generated network."""
    errors = scorer.errors(stacked)
    distance = metrics.distance_matrix(stacked, scorer.zoo.pool, scorer.specs)
    return {"test_accuracy": metrics.summary(scorer.accuracy(stacked)),
            "val_accuracy": metrics.summary(scorer.accuracy(stacked, "val")),
            "twin_steps": [int(s) for s in steps],
            "max_iou_vs_zoo": metrics.summary(metrics.error_set_iou(errors, scorer.zoo_errors).max(1).values),
            "nearest_zoo_distance_aligned": metrics.summary(distance.min(1).values)}


def sgd_frontier(scorer: _Scorer, twins: Twins) -> dict[str, list]:
    """The twins along their training: mean validation and test accuracy and mean max IoU vs the zoo
    at every checkpoint. Less accurate networks make more (and more varied) errors, so their max IoU
    with the zoo is lower; this curve is what SGD itself shows at each accuracy."""
    iou = []
    for step in twins.steps.tolist():
        if step not in twins.states:
            raise ValueError(f"twin states at step {step} were not kept (train_twins keep_steps=None keeps all)")
        errors = scorer.errors(twins.states[step])
        iou.append(float(metrics.error_set_iou(errors, scorer.zoo_errors).max(1).values.mean()))
    return {"steps": twins.steps.tolist(), "val_accuracy": twins.val_accuracy.mean(1).tolist(),
            "test_accuracy": twins.test_accuracy.mean(1).tolist(), "max_iou_vs_zoo": iou}


def at_sgd_accuracy(row: Mapping[str, Any], twins: Twins, frontier: Mapping[str, list]) -> dict[str, Any]:
    """A row's max IoU beside SGD's at the row's own (validation) accuracy: the first checkpoint where
    the twins' mean validation accuracy reaches the row's. ``novelty_ratio`` below 1: fewer errors
    shared with the zoo than SGD at the same accuracy."""
    index, reached = twins.curve_reaching(row["val_accuracy"]["mean"])
    sgd_iou = frontier["max_iou_vs_zoo"][index]
    return {"twin_step": frontier["steps"][index], "reached": reached, "sgd_max_iou_vs_zoo": sgd_iou,
            "novelty_ratio": _ratio(row["max_iou_vs_zoo"]["mean"], sgd_iou)}


def _ratio(a: float, b: float) -> float:
    return a / b if b and math.isfinite(a) and math.isfinite(b) else float("nan")


def placement(row: Mapping[str, Any], baselines: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Where a row sits among the baselines on the accuracy-novelty plane.

    Raw max IoU falls with accuracy, so novelty is compared at equal accuracy: each row's max IoU
    over SGD's at the row's own accuracy (``at_sgd_accuracy.novelty_ratio``; lower = more novel).
    A baseline dominates a row when it is at least as accurate (test) and at least as novel by
    that ratio, and strictly better on one."""
    acc, novelty = row["test_accuracy"]["mean"], row["at_sgd_accuracy"]["novelty_ratio"]
    out = {"more_accurate_than": [], "more_novel_than": [], "dominated_by": [], "dominates": []}
    for name, other in baselines.items():
        b_acc, b_novelty = other["test_accuracy"]["mean"], other["at_sgd_accuracy"]["novelty_ratio"]
        if acc > b_acc:
            out["more_accurate_than"].append(name)
        if novelty < b_novelty:
            out["more_novel_than"].append(name)
        if b_acc >= acc and b_novelty <= novelty and (b_acc > acc or b_novelty < novelty):
            out["dominated_by"].append(name)
        if acc >= b_acc and novelty <= b_novelty and (acc > b_acc or novelty < b_novelty):
            out["dominates"].append(name)
    return out


def evaluate(*, model: nn.Module, specs: Sequence[LayerSpec], task: Task, zoo: ZooFinals, twins: Twins,
             generated: Sequence[Generated], baselines: Sequence[Baseline], options: Options = Options(),
             progress=None) -> dict[str, Any]:
    """Every number of the report. ``generated[g].states[k]`` and the twins share the same inits
    in the same order (``twins.seeds``). ``progress`` is an optional callable(str) for a bar."""
    tick = progress or (lambda message: None)
    scorer = _Scorer(model, specs, task, zoo)
    twin_final = twins.final
    tick("zoo")
    zoo_rows = min(len(zoo.seeds), options.zoo_rows)  # zoo-vs-zoo costs zoo_rows x pool Hungarian matchings
    zoo_row = scorer.score(metrics.select(zoo.finals, list(range(zoo_rows))), zoo_members=zoo_rows)
    tick("twins")
    twin_row = scorer.score(twin_final)
    frontier = sgd_frontier(scorer, twins)
    for row in (zoo_row, twin_row):
        row["at_sgd_accuracy"] = at_sgd_accuracy(row, twins, frontier)
    baseline_rows = {}
    for baseline in baselines:
        tick(f"baseline {baseline.name}")
        row = scorer.score(baseline.networks)
        baseline_rows[baseline.name] = {**row, "description": baseline.description, "sources": baseline.sources,
                                        "at_sgd_accuracy": at_sgd_accuracy(row, twins, frontier)}
    init = twins.states[0]
    matrices = {"zoo_vs_zoo": metrics.error_set_iou(scorer.zoo_errors[:zoo_rows], scorer.zoo_errors[:zoo_rows]),
                "twin_vs_twin": twin_row["_matrices"]["self"]}
    twin_pruned = {f"{p:g}": metrics.summary(scorer.accuracy(magnitude_prune(
        twin_final, p, batch_dims=1, names=[s.weight for s in specs]))) for p in options.prune_fractions}
    twin_quantized = {f"int{b}": metrics.summary(scorer.accuracy(quantize(
        twin_final, b, batch_dims=1, names=[s.weight for s in specs]))) for b in options.quantize_bits}
    result_generators = {}
    for gen in generated:
        tick(f"generator {gen.name}")
        steps = len(gen.states) - 1
        final = gen.states[-1]
        row = scorer.score(final)
        per_step = []
        for k, state in enumerate(gen.states):
            fraction = k / steps
            twin_step = int(twins.steps[(twins.steps.double() - fraction * twins.final_step).abs().argmin()])
            twin_acc = twins.test_accuracy[int((twins.steps == twin_step).nonzero()[0, 0])]
            per_step.append({
                "step": k, "time": fraction,
                "test_accuracy": metrics.summary(scorer.accuracy(state)),
                "cosine_to_twin": metrics.summary(metrics.cosine_similarity(state, twin_final)),
                "magnitude_ratio_to_twin": metrics.summary(metrics.magnitude_ratio(state, twin_final)),
                "update_cosine_to_twin": metrics.summary(metrics.cosine_similarity(
                    metrics.subtract(state, init), metrics.subtract(twin_final, init))) if k > 0 else None,
                "twin_step": twin_step, "twin_test_accuracy": metrics.summary(twin_acc),
            })
        sensitivity = metrics.input_sensitivity(final, twin_final, specs)
        sensitivity["input_insensitive"] = bool(not sensitivity["ratio"] > options.insensitive_below)
        row["at_sgd_accuracy"] = at_sgd_accuracy(row, twins, frontier)
        gen_val = scorer.accuracy(final, "val")
        # SGD's twin from the same init, at the checkpoint where its validation accuracy first reaches
        # this network's: time to the same accuracy, and novelty at matched accuracy
        twin_seconds, reached = twins.time_to_reach(gen_val)
        matched_index, _ = twins.first_reaching(gen_val)
        matched = _matched_novelty(scorer, twins.at_checkpoints(matched_index), twins.steps[matched_index])
        per_network = gen.seconds / len(gen_val)
        timing = {"generation_seconds": gen.seconds, "networks": len(gen_val),
                  "generation_seconds_per_network": per_network,
                  "twin_seconds_to_same_accuracy": metrics.summary(twin_seconds),
                  "twins_reaching": int(reached.sum()), "twin_group_size": twins.group_size,
                  "ratio": _ratio(float(twin_seconds.median()), per_network)}
        pruned = {f"{p:g}": metrics.summary(scorer.accuracy(magnitude_prune(
            final, p, batch_dims=1, names=[s.weight for s in specs]))) for p in options.prune_fractions}
        quantized = {f"int{b}": metrics.summary(scorer.accuracy(quantize(
            final, b, batch_dims=1, names=[s.weight for s in specs]))) for b in options.quantize_bits}
        headline = {
            "accuracy_ratio": _ratio(row["test_accuracy"]["mean"], twin_row["test_accuracy"]["mean"]),
            "novelty_ratio": _ratio(row["max_iou_vs_zoo"]["mean"], twin_row["max_iou_vs_zoo"]["mean"]),
            "weight_novelty_ratio": _ratio(row["nearest_zoo_distance_aligned"]["mean"],
                                           twin_row["nearest_zoo_distance_aligned"]["mean"]),
            "novelty_ratio_matched_accuracy": _ratio(row["max_iou_vs_zoo"]["mean"],
                                                     matched["max_iou_vs_zoo"]["mean"]),
            "weight_novelty_ratio_matched_accuracy": _ratio(row["nearest_zoo_distance_aligned"]["mean"],
                                                            matched["nearest_zoo_distance_aligned"]["mean"]),
            "diversity_ratio": _ratio(row["diversity_disagreement"], twin_row["diversity_disagreement"]),
            "input_sensitivity_ratio": sensitivity["ratio"],
            "time_to_accuracy_ratio": timing["ratio"],
        }
        # one network for (nearly) every init: less spread in weights and in predictions than SGD from the same inits
        sensitivity["collapsed"] = bool(not headline["input_sensitivity_ratio"] >= options.collapse_below
                                        and not headline["diversity_ratio"] >= options.collapse_below)
        matrices[f"{gen.name}_vs_{gen.name}"] = row["_matrices"]["self"]
        matrices[f"{gen.name}_vs_zoo"] = row["_matrices"]["vs_zoo"]
        result_generators[gen.name] = {
            **_public(row), "info": gen.info, "per_step": per_step, "input_sensitivity": sensitivity,
            "time_to_accuracy": timing, "pruned_test_accuracy": pruned,
            "quantized_test_accuracy": quantized, "twins_at_matched_accuracy": matched, "headline": headline,
            "placement": placement(row, baseline_rows),
        }
    twin_curve = {**frontier, "seconds_per_network": twins.seconds.mean(1).tolist(), "group_size": twins.group_size}
    result = {
        "task": {"name": task.name, "test_examples": len(task.y_test), "val_examples": len(task.y_val)},
        "zoo": {**_public(zoo_row), "seeds": zoo.seeds, "novelty_pool": zoo.pool_name,
                "pool_size": metrics.count(zoo.pool)},
        "twins": {**_public(twin_row), "seeds": twins.seeds, "final_step": twins.final_step, "curve": twin_curve,
                  "pruned_test_accuracy": twin_pruned, "quantized_test_accuracy": twin_quantized},
        "baselines": {name: _public(row) for name, row in baseline_rows.items()},
        "generators": result_generators,
        "options": {"insensitive_below": options.insensitive_below, "collapse_below": options.collapse_below,
                    "prune_fractions": list(options.prune_fractions),
                    "quantize_bits": list(options.quantize_bits)},
    }
    if options.keep_matrices:
        result["iou_matrices"] = {name: m.tolist() for name, m in matrices.items()}
    return result


def _public(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if not k.startswith("_")}
