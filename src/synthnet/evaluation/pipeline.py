"""The evaluation that cannot be fooled: generated networks beside their SGD twins, the zoo
and the trivial baselines, on the same axes, in one run.

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
from synthnet.methods.rewards import magnitude_prune
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
    prune_fractions: tuple[float, ...] = (0.5, 0.8)
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


def _matched_novelty(scorer: _Scorer, stacked) -> dict[str, Any]:
    """Accuracy and novelty of twins taken at the checkpoint where each matches a generated network."""
    errors = scorer.errors(stacked)
    distance = metrics.distance_matrix(stacked, scorer.zoo.pool, scorer.specs)
    return {"test_accuracy": metrics.summary(scorer.accuracy(stacked)),
            "max_iou_vs_zoo": metrics.summary(metrics.error_set_iou(errors, scorer.zoo_errors).max(1).values),
            "nearest_zoo_distance_aligned": metrics.summary(distance.min(1).values)}


def _ratio(a: float, b: float) -> float:
    return a / b if b and math.isfinite(a) and math.isfinite(b) else float("nan")


def placement(row: Mapping[str, Any], baselines: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Where a row sits among the baselines on the accuracy-novelty plane (novelty = low max IoU)."""
    acc, iou = row["test_accuracy"]["mean"], row["max_iou_vs_zoo"]["mean"]
    out = {"more_accurate_than": [], "more_novel_than": [], "dominated_by": [], "dominates": []}
    for name, other in baselines.items():
        b_acc, b_iou = other["test_accuracy"]["mean"], other["max_iou_vs_zoo"]["mean"]
        if acc > b_acc:
            out["more_accurate_than"].append(name)
        if iou < b_iou:
            out["more_novel_than"].append(name)
        if b_acc >= acc and b_iou <= iou and (b_acc > acc or b_iou < iou):
            out["dominated_by"].append(name)
        if acc >= b_acc and iou <= b_iou and (acc > b_acc or iou < b_iou):
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
    baseline_rows = {}
    for baseline in baselines:
        tick(f"baseline {baseline.name}")
        baseline_rows[baseline.name] = {**scorer.score(baseline.networks), "description": baseline.description,
                                        "sources": baseline.sources}
    init = twins.states[0]
    matrices = {"zoo_vs_zoo": metrics.error_set_iou(scorer.zoo_errors[:zoo_rows], scorer.zoo_errors[:zoo_rows]),
                "twin_vs_twin": twin_row["_matrices"]["self"]}
    twin_pruned = {f"{p:g}": metrics.summary(scorer.accuracy(magnitude_prune(
        twin_final, p, batch_dims=1, names=[s.weight for s in specs]))) for p in options.prune_fractions}
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
        gen_acc = scorer.accuracy(final)
        twin_seconds, reached = twins.time_to_reach(gen_acc)
        # the same twin when SGD first reaches this network's accuracy: novelty at matched accuracy
        matched_index, _ = twins.first_reaching(gen_acc)
        matched = _matched_novelty(scorer, twins.at_checkpoints(matched_index))
        timing = {"generation_seconds": gen.seconds, "networks": len(gen_acc),
                  "twin_seconds_to_same_accuracy": metrics.summary(twin_seconds),
                  "twins_reaching": int(reached.sum()),
                  "twin_evaluation_seconds_per_checkpoint": twins.evaluation_seconds,
                  "ratio": _ratio(float(twin_seconds.median()), gen.seconds)}
        pruned = {f"{p:g}": metrics.summary(scorer.accuracy(magnitude_prune(
            final, p, batch_dims=1, names=[s.weight for s in specs]))) for p in options.prune_fractions}
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
            "twins_at_matched_accuracy": matched, "headline": headline,
            "placement": placement(row, baseline_rows),
        }
    twin_curve = {"steps": twins.steps.tolist(), "net_seconds": twins.net_seconds.tolist(),
                  "gross_seconds": twins.gross_seconds.tolist(),
                  "test_accuracy_mean": twins.test_accuracy.mean(1).tolist()}
    result = {
        "task": {"name": task.name, "test_examples": len(task.y_test), "val_examples": len(task.y_val)},
        "zoo": {**_public(zoo_row), "seeds": zoo.seeds, "novelty_pool": zoo.pool_name,
                "pool_size": metrics.count(zoo.pool)},
        "twins": {**_public(twin_row), "seeds": twins.seeds, "final_step": twins.final_step, "curve": twin_curve,
                  "pruned_test_accuracy": twin_pruned},
        "baselines": {name: _public(row) for name, row in baseline_rows.items()},
        "generators": result_generators,
        "options": {"insensitive_below": options.insensitive_below, "collapse_below": options.collapse_below,
                    "prune_fractions": list(options.prune_fractions)},
    }
    if options.keep_matrices:
        result["iou_matrices"] = {name: m.tolist() for name, m in matrices.items()}
    return result


def _public(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if not k.startswith("_")}
