"""Trivial baselines built from the zoo's final checkpoints, scored on the same axes as the
generator: a generator that copies or averages its training checkpoints lands next to them.

Every baseline records the zoo seeds each of its networks was built from (``sources``), so
the claim "computed from the zoo" is checkable. Choices that need a criterion (which final
to copy, which one anchors the alignment) use validation accuracy, never test.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from synthnet.evaluation.metrics import align_pairs, count, select
from synthnet.targets import LayerSpec


@dataclass
class Baseline:
    name: str
    description: str
    networks: dict[str, torch.Tensor] = field(repr=False)  # stacked (count, *shape)
    sources: list[list[int]]  # zoo seeds each network was built from


def _broadcast(stacked: Mapping[str, torch.Tensor], index: int, times: int) -> dict[str, torch.Tensor]:
    return {name: tensor[index].expand(times, *tensor.shape[1:]) for name, tensor in stacked.items()}


def align_to_anchor(finals: Mapping[str, torch.Tensor], anchor: int, specs: Sequence[LayerSpec]) -> dict:
    """Every network of the stack with its hidden units matched to network ``anchor``'s."""
    return align_pairs(finals, _broadcast(finals, anchor, count(finals)), specs)


def build_baselines(finals: Mapping[str, torch.Tensor], seeds: Sequence[int], val_accuracy: Sequence[float],
                    specs: Sequence[LayerSpec], *, count_per_baseline: int, average_size: int = 16,
                    noise_scales: Sequence[float] = (0.1, 0.5), seed: int = 0) -> list[Baseline]:
    """The trivial baselines, ``count_per_baseline`` networks each, from zoo finals (Z, *shape).

    * ``copy``: zoo finals themselves, best validation accuracy first.
    * ``average``/``aligned average``: each network is the mean of ``average_size`` finals
      drawn without replacement (seeded); the aligned variant first matches the hidden units
      of each drawn final to the first drawn one.
    * ``noise x s``: a copied final plus Gaussian noise of ``s`` times each tensor's RMS.
    * ``gaussian fit``: samples of a per-coordinate Gaussian fitted to all finals, aligned
      to the best-validation final.
    """
    zoo_size = count(finals)
    seeds = [int(s) for s in seeds]
    generator = torch.Generator().manual_seed(int(seed))
    order = sorted(range(zoo_size), key=lambda i: (-float(val_accuracy[i]), seeds[i]))
    picks = [order[i % zoo_size] for i in range(count_per_baseline)]
    baselines = [Baseline("copy", "a zoo final checkpoint, unchanged", select(finals, picks),
                          [[seeds[i]] for i in picks])]

    size = min(int(average_size), zoo_size)
    draws = [torch.randperm(zoo_size, generator=generator)[:size].tolist() for _ in range(count_per_baseline)]
    plain, aligned = [], []
    for draw in draws:
        members = select(finals, draw)
        plain.append({name: tensor.mean(0) for name, tensor in members.items()})
        matched = align_pairs(members, _broadcast(members, 0, size), specs)
        aligned.append({name: tensor.mean(0) for name, tensor in matched.items()})
    stack = lambda dicts: {name: torch.stack([d[name] for d in dicts]) for name in dicts[0]}  # noqa: E731
    baselines.append(Baseline("average", f"mean of {size} zoo finals, unaligned", stack(plain),
                              [[seeds[i] for i in d] for d in draws]))
    baselines.append(Baseline("aligned average", f"mean of {size} zoo finals after Hungarian alignment",
                              stack(aligned), [[seeds[i] for i in d] for d in draws]))

    copies = select(finals, picks)
    for scale in noise_scales:
        noisy = {}
        for name, tensor in copies.items():
            rms = tensor.pow(2).mean(dim=tuple(range(1, tensor.dim())), keepdim=True).sqrt()
            noisy[name] = tensor + float(scale) * rms * torch.randn(tensor.shape, generator=generator,
                                                                   dtype=tensor.dtype)
        baselines.append(Baseline(f"noise x{scale:g}", f"zoo final + Gaussian noise, std {scale:g} x tensor RMS",
                                  noisy, [[seeds[i]] for i in picks]))

    anchored = align_to_anchor(finals, order[0], specs)
    mean = {name: tensor.mean(0) for name, tensor in anchored.items()}
    std = {name: tensor.std(0, unbiased=zoo_size > 1) if zoo_size > 1 else torch.zeros_like(tensor[0])
           for name, tensor in anchored.items()}
    fitted = {name: mean[name] + std[name] * torch.randn((count_per_baseline, *mean[name].shape),
                                                         generator=generator, dtype=mean[name].dtype)
              for name in mean}
    baselines.append(Baseline("gaussian fit", f"per-coordinate Gaussian fitted to {zoo_size} aligned zoo finals",
                              fitted, [list(seeds) for _ in range(count_per_baseline)]))
    return baselines
