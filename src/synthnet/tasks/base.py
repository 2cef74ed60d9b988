"""The task type and the helpers every dataset loader shares (kept apart from the registry in
:mod:`synthnet.tasks` so that loaders and registry do not import each other)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from synthnet.errors import SynthNetError


@dataclass(frozen=True)
class Task:
    """A classification dataset split three ways. Inputs are float32, labels int64."""

    name: str
    input_shape: tuple[int, ...]  # per example, channel first: (1, 8, 8) or (1, 40)
    num_classes: int
    x_train: torch.Tensor  # (n_train, *input_shape)
    y_train: torch.Tensor  # (n_train,)
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(inputs, labels)`` of ``train``, ``val`` or ``test``."""
        if name not in ("train", "val", "test"):
            raise SynthNetError(f"unknown split '{name}'; use train, val or test")
        return getattr(self, f"x_{name}"), getattr(self, f"y_{name}")

    def summary(self) -> str:
        return (f"{self.name}: input {tuple(self.input_shape)}, {self.num_classes} classes, "
                f"train/val/test = {len(self.y_train)}/{len(self.y_val)}/{len(self.y_test)}")


def carve_validation(x: np.ndarray, y: np.ndarray, val_fraction: float, seed: int):
    """Split ``(x, y)`` into train and validation with a seeded permutation (no global RNG)."""
    if not 0.0 < val_fraction < 1.0:
        raise SynthNetError(f"task.val_fraction must be in (0, 1), got {val_fraction}")
    order = np.random.default_rng(seed).permutation(len(y))
    n_val = max(1, int(round(val_fraction * len(y))))
    val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
    return x[train_idx], y[train_idx], x[val_idx], y[val_idx]


def make_task(name: str, input_shape, num_classes: int, splits) -> Task:
    """Build a :class:`Task` from numpy arrays ``(x_train, y_train, x_val, y_val, x_test, y_test)``."""
    tensors = []
    for i, array in enumerate(splits):
        dtype = torch.float32 if i % 2 == 0 else torch.int64
        tensors.append(torch.as_tensor(np.ascontiguousarray(array)).to(dtype))
    for i in range(0, 6, 2):
        tensors[i] = tensors[i].reshape(-1, *input_shape)
    return Task(name, tuple(int(s) for s in input_shape), int(num_classes), *tensors)
