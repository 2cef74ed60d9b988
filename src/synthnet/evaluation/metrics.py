"""Pure metrics of the evaluation report: behaviour (error sets, disagreement), weights
(Hungarian neuron alignment, distances, cosine, magnitude) and input sensitivity.

Networks of one target are passed *stacked*: ``{name: (R, *shape)}``, as produced by
:func:`synthnet.evaluation.scoring.stack_state_dicts`. Predictions are (R, N) int64
class indices; error sets are (R, N) bool (True where a network is wrong).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from synthnet.targets import LayerSpec, expand_permutation

Stacked = Mapping[str, torch.Tensor]


def summary(values: Sequence[float] | torch.Tensor | np.ndarray) -> dict[str, float]:
    """mean, median, std (population), min, max of a 1-D collection."""
    array = np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values, dtype=float).reshape(-1)
    if array.size == 0:
        return {k: float("nan") for k in ("mean", "median", "std", "min", "max")}
    return {"mean": float(array.mean()), "median": float(np.median(array)), "std": float(array.std()),
            "min": float(array.min()), "max": float(array.max())}


def count(stacked: Stacked) -> int:
    return int(next(iter(stacked.values())).shape[0])


def select(stacked: Stacked, index: Sequence[int] | torch.Tensor) -> dict[str, torch.Tensor]:
    """Networks ``index`` of a stack: {name: (len(index), *shape)}."""
    index = torch.as_tensor(index, dtype=torch.long)
    return {name: tensor[index] for name, tensor in stacked.items()}


def flatten(stacked: Stacked) -> torch.Tensor:
    """All parameters of each network in one vector: (R, P), in sorted name order."""
    return torch.cat([stacked[name].reshape(stacked[name].shape[0], -1).double() for name in sorted(stacked)], dim=1)


# --------------------------------------------------------------------------- behaviour


def error_sets(predictions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(R, N) predictions, (N,) labels -> (R, N) bool, True where the network is wrong."""
    return predictions != labels.to(predictions.device)[None]


def error_set_iou(errors_a: torch.Tensor, errors_b: torch.Tensor) -> torch.Tensor:
    """IoU of error sets: (A, N), (B, N) bool -> (A, B) float64. Two empty sets count as identical (1)."""
    a, b = errors_a.double(), errors_b.double()
    intersection = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - intersection
    return torch.where(union > 0, intersection / union.clamp_min(1), torch.ones_like(union))


def disagreement(predictions_a: torch.Tensor, predictions_b: torch.Tensor) -> torch.Tensor:
    """Fraction of examples on which two networks predict different classes: (A, N), (B, N) -> (A, B)."""
    return (predictions_a[:, None, :] != predictions_b[None, :, :]).double().mean(-1)


def mean_off_diagonal(matrix: torch.Tensor) -> float:
    """Mean of a square matrix without its diagonal (pairs of distinct members); NaN below 2 members."""
    n = matrix.shape[0]
    if n < 2:
        return float("nan")
    mask = ~torch.eye(n, dtype=torch.bool, device=matrix.device)
    return float(matrix[mask].double().mean())


# --------------------------------------------------------------------------- weights


def _rows(stacked: Stacked, spec: LayerSpec) -> torch.Tensor:
    """Each unit's incoming weights and bias as one row: (R, out, in * kernel [+ 1])."""
    weight = stacked[spec.weight]
    rows = weight.reshape(weight.shape[0], weight.shape[1], -1).double()
    if spec.bias is not None:
        rows = torch.cat([rows, stacked[spec.bias].double()[..., None]], dim=-1)
    return rows


def _permute_inputs(weight: torch.Tensor, perms: torch.Tensor, repeat: int) -> torch.Tensor:
    """weight (R, out, in, *k) with input units reordered per network by perms (R, in_units)."""
    columns = torch.stack([expand_permutation(p, repeat) for p in perms])  # (R, in)
    index = columns.reshape(columns.shape[0], 1, -1, *([1] * (weight.dim() - 3)))
    return torch.take_along_dim(weight, index.expand(-1, weight.shape[1], -1, *weight.shape[3:]), dim=2)


def align_pairs(candidates: Stacked, references: Stacked, specs: Sequence[LayerSpec]) -> dict[str, torch.Tensor]:
    """Align candidate ``i`` to reference ``i`` for every i: (R, ...) each -> aligned candidates (R, ...).

    Hidden units are matched layer by layer, from the input side, with the Hungarian
    algorithm (``scipy.optimize.linear_sum_assignment``) maximising the dot product of each
    unit's incoming weights and bias, after the previous layer's matching has been applied
    to its inputs. The result computes exactly the function of the candidate
    (:func:`synthnet.targets.permute_hidden` semantics), so a neuron-permuted copy aligns
    back to distance zero.
    """
    aligned = {name: tensor.clone() for name, tensor in candidates.items()}
    for i, spec in enumerate(specs[:-1]):
        cost = -(_rows(references, spec) @ _rows(aligned, spec).transpose(1, 2))  # (R, out, out)
        perms = torch.stack([torch.as_tensor(linear_sum_assignment(c.cpu().numpy())[1], dtype=torch.long)
                             for c in cost]).to(aligned[spec.weight].device)  # (R, out)
        gather = perms.reshape(*perms.shape, *([1] * (aligned[spec.weight].dim() - 2)))
        aligned[spec.weight] = torch.take_along_dim(aligned[spec.weight], gather, dim=1)
        if spec.bias is not None:
            aligned[spec.bias] = torch.take_along_dim(aligned[spec.bias], perms, dim=1)
        following = specs[i + 1]
        aligned[following.weight] = _permute_inputs(aligned[following.weight], perms, following.in_repeat)
    return aligned


def relative_distance(a: Stacked, b: Stacked) -> torch.Tensor:
    """||a_i - b_i|| / ||b_i|| over all parameters, per pair: (R,) float64."""
    fa, fb = flatten(a), flatten(b)
    return (fa - fb).norm(dim=1) / fb.norm(dim=1).clamp_min(1e-12)


def distance_matrix(candidates: Stacked, pool: Stacked, specs: Sequence[LayerSpec], aligned: bool = True,
                    max_values: int = 4_000_000) -> torch.Tensor:
    """Relative distance of every candidate to every pool member: (C, P) float64.

    With ``aligned`` the candidate's hidden units are first matched to the pool member's
    (:func:`align_pairs`, greedy from the input side, so it can miss the best matching; the
    unpermuted distance is used where it is smaller). Distances are relative to the pool
    member's norm.
    """
    c, p = count(candidates), count(pool)
    ia = torch.arange(c).repeat_interleave(p)
    ib = torch.arange(p).repeat(c)
    out = torch.empty(c * p, dtype=torch.float64)
    block = max(1, max_values // flatten(select(pool, [0])).shape[1])  # pairs per batch, bounded memory
    for start in range(0, c * p, block):
        a, b = select(candidates, ia[start:start + block]), select(pool, ib[start:start + block])
        distance = relative_distance(a, b)
        if aligned:  # the identity is a matching too: keep whichever is closer
            distance = torch.minimum(distance, relative_distance(align_pairs(a, b, specs), b))
        out[start:start + block] = distance.cpu()
    return out.reshape(c, p)


def pairwise_distance(networks: Stacked, specs: Sequence[LayerSpec], aligned: bool = True) -> float:
    """Mean relative distance over ordered pairs of distinct networks of one stack (NaN below 2)."""
    matrix = distance_matrix(networks, networks, specs, aligned=aligned)
    return mean_off_diagonal(matrix)


def cosine_similarity(a: Stacked, b: Stacked) -> torch.Tensor:
    """Cosine between all-parameter vectors of network pairs: (R,) float64."""
    return torch.nn.functional.cosine_similarity(flatten(a), flatten(b), dim=1)


def magnitude_ratio(a: Stacked, b: Stacked) -> torch.Tensor:
    """||a_i|| / ||b_i|| over all parameters: (R,) float64."""
    return flatten(a).norm(dim=1) / flatten(b).norm(dim=1).clamp_min(1e-12)


def subtract(a: Stacked, b: Stacked) -> dict[str, torch.Tensor]:
    return {name: a[name] - b[name] for name in a}


def input_sensitivity(outputs: Stacked, reference_outputs: Stacked, specs: Sequence[LayerSpec]) -> dict[str, float]:
    """How much a generator's outputs vary with its input, against a reference (the SGD twins).

    Both stacks come from the same R inits. The spread is the mean aligned relative distance
    between outputs of distinct inits; ``ratio`` = generated spread / reference spread. A
    generator that ignores its input emits (nearly) one network and has ratio ~ 0.
    """
    spread = pairwise_distance(outputs, specs)
    reference = pairwise_distance(reference_outputs, specs)
    return {"spread": spread, "reference_spread": reference,
            "ratio": spread / reference if reference > 0 else float("nan")}
