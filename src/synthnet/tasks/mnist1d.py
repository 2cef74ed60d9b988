"""MNIST-1D (Greydanus & Kobak, 2020), generated procedurally by the ``mnist1d`` package.

The package seeds NumPy's and Python's global RNGs while it builds the data; we restore the
caller's states afterwards so loading the task never changes anyone else's random stream.
"""

from __future__ import annotations

import random

import numpy as np

from synthnet.tasks.base import Task, carve_validation, make_task
from synthnet.tasks.options import MNIST1DOptions


def load_mnist1d_task(options: MNIST1DOptions) -> Task:
    """The package's standard 4,000 / 1,000 train/test data (length 40); validation carved from train."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = int(options.num_samples)
    args.seed = int(options.data_seed)
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
    x = np.asarray(data["x"], dtype=np.float32)
    x_test = np.asarray(data["x_test"], dtype=np.float32)
    x_train, y_train, x_val, y_val = carve_validation(
        x, np.asarray(data["y"]), float(options.val_fraction), int(options.split_seed))
    length = x.shape[-1]
    return make_task("mnist1d", (1, length), 10,
                     (x_train, y_train, x_val, y_val, x_test, np.asarray(data["y_test"])))
