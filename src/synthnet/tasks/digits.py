"""scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes): the embedded default task."""

from __future__ import annotations


import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from synthnet.tasks.base import Task, carve_validation, make_task
from synthnet.tasks.options import DigitsOptions


def load_digits_task(options: DigitsOptions) -> Task:
    """Pixels scaled to [0, 1]; stratified seeded test split, validation carved from train."""
    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    seed = int(options.split_seed)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=float(options.test_fraction), random_state=seed, stratify=y)
    x_train, y_train, x_val, y_val = carve_validation(
        x_train, y_train, float(options.val_fraction), seed + 1)
    return make_task("digits", (1, 8, 8), 10, (x_train, y_train, x_val, y_val, x_test, y_test))
