"""A checkpoint zoo in memory as tokens: the data every training method reads.

``load_zoo_tokens`` reads every run under a zoo's ``checkpoints/`` folder into one tensor
(runs, checkpoints, tokens, chunk) with the time of each checkpoint, ``t = step /
final_step`` from the headers (0 = the random init, 1 = the end of the run).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

from synthnet.errors import SynthNetError
from synthnet.storage import load_state_dict
from synthnet.targets import LayerSpec
from synthnet.tokenization import TokenLayout, tokenize
from synthnet.zoo import checkpoint_header, list_runs


@dataclass
class ZooTokens:
    """Runs of one zoo, tokenised. Index runs by position; ``seeds[i]`` names run i."""

    tokens: torch.Tensor  # (runs, checkpoints, tokens, chunk)
    times: torch.Tensor  # (runs, checkpoints) in [0, 1], increasing
    seeds: list[int]
    final_test_accuracy: torch.Tensor  # (runs,)
    layout: TokenLayout
    specs: list[LayerSpec]
    target_config: dict
    task_config: dict

    @property
    def num_runs(self) -> int:
        return int(self.tokens.shape[0])

    def select(self, runs: Sequence[int]) -> "ZooTokens":
        index = torch.as_tensor(list(runs), dtype=torch.long)
        return ZooTokens(self.tokens[index], self.times[index], [self.seeds[i] for i in runs],
                         self.final_test_accuracy[index], self.layout, self.specs, self.target_config,
                         self.task_config)


def zoo_architectures(checkpoints_dir: str | Path) -> tuple[dict[str, tuple[dict, list[int]]], dict | None]:
    """The architectures of a zoo's runs from their last checkpoints' headers: ``({key: (target config,
    seeds)}, family)``, where ``family`` is the ``{"base", "widths", "depths"}`` of a family zoo (``zoo.family_*``)
    and None for a zoo of one target. Keys are in order of first seed."""
    runs = list_runs(checkpoints_dir)
    if not runs:
        raise SynthNetError(f"no zoo in {checkpoints_dir}; build it first with `synthnet zoo` "
                            f"(same target=, task= and paths.root= overrides)")
    groups: dict[str, tuple[dict, list[int]]] = {}
    families = set()
    for seed, files in sorted(runs.items()):
        meta = checkpoint_header(files[-1])
        config = dict(meta["target_config"])
        groups.setdefault(repr(sorted(config.items())), (config, []))[1].append(seed)
        families.add(repr(meta.get("family")))
    if len(families) > 1:
        raise SynthNetError(f"the zoo in {checkpoints_dir} mixes runs of different families (zoo.family_*); "
                            f"one zoo folder holds one family")
    family = checkpoint_header(next(iter(runs.values()))[-1]).get("family")
    if family is not None and not (isinstance(family, dict) and isinstance(family.get("base"), dict)
                                   and all(isinstance(family.get(k), list) for k in ("widths", "depths"))):
        raise SynthNetError(f"the zoo in {checkpoints_dir} has a malformed 'family' in its headers: {family!r}")
    return groups, family


def load_zoo_tokens(checkpoints_dir: str | Path, layout: TokenLayout, specs: Sequence[LayerSpec],
                    expected: Mapping[str, torch.Tensor], *, target_config: Mapping | None = None,
                    max_runs: int | None = None, seeds: Sequence[int] | None = None) -> ZooTokens:
    """Read every run of the zoo at ``checkpoints_dir`` (or the runs of ``seeds``) into memory as tokens.

    ``expected`` (a state dict of the target) checks names and shapes; ``target_config``,
    when given, must match the zoo's headers. Runs must share their checkpoint steps;
    runs with fewer checkpoints than the most common count (interrupted) are skipped.
    """
    runs = list_runs(checkpoints_dir)
    if seeds is not None:
        runs = {s: files for s, files in runs.items() if s in set(seeds)}
    if not runs:
        raise SynthNetError(f"no zoo in {checkpoints_dir}; build it first with `synthnet zoo` "
                            f"(same target=, task= and paths.root= overrides)")
    counts = [len(files) for files in runs.values()]
    common = max(set(counts), key=counts.count)
    seeds = sorted(s for s, files in runs.items() if len(files) == common)
    if max_runs is not None:
        seeds = seeds[:max_runs]
    tokens, times, finals, zoo_target, zoo_task = [], [], [], None, None
    for seed in seeds:
        run_tokens, run_times = [], []
        for path in runs[seed]:
            state, meta = load_state_dict(path, expected)
            meta = checkpoint_header(path, meta)
            if zoo_target is None:
                zoo_target, zoo_task = meta.get("target_config"), meta.get("task_config")
                if target_config is not None and zoo_target is not None and dict(zoo_target) != dict(target_config):
                    raise SynthNetError(f"the zoo in {checkpoints_dir} was trained for target {zoo_target}, "
                                        f"not {dict(target_config)}")
            final_step = int(meta.get("final_step") or runs[seed][-1].stem.split("_")[-1])
            run_tokens.append(tokenize(state, layout))
            run_times.append(int(meta["step"]) / final_step)
        if run_times[0] != 0.0:
            raise SynthNetError(f"run seed {seed} in {checkpoints_dir} has no step-0 checkpoint (the random init)")
        finals.append(float(meta.get("test_accuracy", float("nan"))))
        tokens.append(torch.stack(run_tokens))
        times.append(torch.tensor(run_times))
    return ZooTokens(torch.stack(tokens), torch.stack(times), seeds, torch.tensor(finals), layout, list(specs),
                     dict(zoo_target or target_config or {}), dict(zoo_task or {}))


def split_runs(num_runs: int, val_runs: int) -> tuple[list[int], list[int]]:
    """Split run positions into (train, validation) by seed order: the last ``val_runs`` runs
    validate, never a checkpoint of a training run. With a single run there is no validation."""
    val_runs = max(0, min(int(val_runs), num_runs - 1))
    return list(range(num_runs - val_runs)), list(range(num_runs - val_runs, num_runs))
