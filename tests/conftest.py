"""Shared fixtures: tiny tasks and zoos built on the fly (no downloads, CPU only)."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("SYNTHNET_TEST_THREADS", "2")))


@pytest.fixture(scope="session")
def digits_task():
    from synthnet.tasks import build_task
    return build_task({"name": "digits", "test_fraction": 0.2, "val_fraction": 0.1, "split_seed": 0}, "unused")


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory, digits_task):
    """A 3-run x 3-epoch digits MLP zoo (hidden 16); returns its checkpoints dir and config."""
    from synthnet.targets import build_target
    from synthnet.zoo import ZooSpec, build_zoo
    from synthnet.zoo.training import Recipe

    root = tmp_path_factory.mktemp("zoo")
    target = {"name": "mlp", "hidden": [16], "activation": "relu"}
    task = {"name": "digits", "test_fraction": 0.2, "val_fraction": 0.1, "split_seed": 0}
    recipe = Recipe(epochs=3, batch_size=64, lr=0.01)
    spec = ZooSpec(target, task, recipe)
    model = build_target(target, digits_task.input_shape, digits_task.num_classes)
    build_zoo(model=model, spec=spec, task=digits_task, seeds=[0, 1, 2], checkpoints_dir=root / "checkpoints",
              progress=False)
    return {"checkpoints_dir": root / "checkpoints", "target": target, "task": task, "recipe": recipe,
            "root": root}
