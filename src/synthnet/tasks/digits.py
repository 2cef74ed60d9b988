"""scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes): the embedded default task."""

from __future__ import annotations

from typing import Mapping

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from synthnet.tasks.base import Task, carve_validation, make_task


def load_digits_task(cfg: Mapping) -> Task:
    """Pixels scaled to [0, 1]; stratified seeded test split, validation carved from train."""
    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    seed = int(cfg.get("split_seed", 0))
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=float(cfg.get("test_fraction", 0.2)), random_state=seed, stratify=y)
    x_train, y_train, x_val, y_val = carve_validation(
        x_train, y_train, float(cfg.get("val_fraction", 0.1)), seed + 1)
    return make_task("digits", (1, 8, 8), 10, (x_train, y_train, x_val, y_val, x_test, y_test))
