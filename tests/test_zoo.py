"""The checkpoint zoo: files and metadata, resume, batched == separate training, torchrun == one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from synthnet.storage import load_state_dict, read_metadata
from synthnet.targets import build_target, init_state_dict
from synthnet.zoo import ZooSpec, build_zoo, checkpoint_path, list_runs
from synthnet.zoo.training import Recipe, steps_per_epoch, train_runs


def test_zoo_files_and_metadata(tiny_zoo, digits_task):
    runs = list_runs(tiny_zoo["checkpoints_dir"])
    per_epoch = steps_per_epoch(digits_task, tiny_zoo["recipe"])
    assert sorted(runs) == [0, 1, 2]
    for seed, paths in runs.items():
        assert [int(p.stem.split("_")[1]) for p in paths] == [0, per_epoch, 2 * per_epoch, 3 * per_epoch]
        meta = read_metadata(paths[-1])
        assert meta["seed"] == seed and meta["step"] == 3 * per_epoch and meta["epoch"] == 3.0 and meta["final"]
        assert meta["target"] == "mlp" and meta["target_config"] == tiny_zoo["target"]
        assert meta["task"] == "digits" and meta["recipe"]["epochs"] == 3 and "synthnet_version" in meta
        for key in ("train_loss", "val_loss", "val_accuracy", "test_accuracy"):
            assert isinstance(meta[key], float)
        assert meta["val_accuracy"] > 0.8 and meta["test_accuracy"] > 0.8
        first = read_metadata(paths[0])
        assert first["step"] == 0 and first["val_accuracy"] < 0.5 and not first["final"]
        # step 0 is exactly the target's own init for this seed
        tensors, _ = load_state_dict(paths[0])
        init = init_state_dict(tiny_zoo["target"], digits_task.input_shape, 10, seed)
        assert all(torch.equal(tensors[k], init[k]) for k in init)
        model = build_target(tiny_zoo["target"], digits_task.input_shape, 10)
        model.load_state_dict(load_file(str(paths[-1])), strict=True)


def test_rerun_skips_completed_runs(tiny_zoo, digits_task):
    spec = ZooSpec(tiny_zoo["target"], tiny_zoo["task"], tiny_zoo["recipe"])
    model = build_target(tiny_zoo["target"], digits_task.input_shape, 10)
    final = checkpoint_path(tiny_zoo["checkpoints_dir"], 1, 3 * steps_per_epoch(digits_task, tiny_zoo["recipe"]))
    before = final.stat().st_mtime_ns
    result = build_zoo(model=model, spec=spec, task=digits_task, seeds=[0, 1, 2], progress=False,
                       checkpoints_dir=tiny_zoo["checkpoints_dir"])
    assert result["trained"] == [] and result["skipped"] == [0, 1, 2]
    assert final.stat().st_mtime_ns == before


def test_batched_training_equals_separate_training(digits_task):
    """Training 2 runs as one vmapped group gives the same weights as training each alone."""
    target = {"name": "mlp", "hidden": [8]}
    model = build_target(target, digits_task.input_shape, 10)
    recipe = Recipe(epochs=1, batch_size=128, lr=0.01)
    inits = [init_state_dict(target, digits_task.input_shape, 10, s) for s in (5, 6)]
    finals = {}

    def keep(checkpoint):
        finals[(checkpoint.seed, checkpoint.step)] = checkpoint.state_dict

    train_runs(model, inits, [5, 6], digits_task, recipe, keep)
    together = dict(finals)
    finals.clear()
    train_runs(model, inits[:1], [5], digits_task, recipe, keep)
    train_runs(model, inits[1:], [6], digits_task, recipe, keep)
    last = steps_per_epoch(digits_task, recipe)
    for seed in (5, 6):
        for name in inits[0]:
            torch.testing.assert_close(together[(seed, last)][name], finals[(seed, last)][name], rtol=1e-5, atol=1e-6)


def _zoo_cli(prefix: list[str], root: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["zoo", "zoo.runs=4", "zoo.epochs=1", "zoo.group_size=2", "zoo.batch_size=128",
            "target.hidden=[8]", f"paths.root={root}", "progress=false"]
    done = subprocess.run(prefix + args, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]


def test_torchrun_two_processes_write_the_same_files_as_one(tmp_path):
    _zoo_cli([sys.executable, "-m", "synthnet"], tmp_path / "one")
    _zoo_cli([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",  # a free port
              "-m", "synthnet"], tmp_path / "two")
    one = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.safetensors"))
    two = sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*.safetensors"))
    assert one == two and len(one) == 8
    for rel in one:
        a, meta_a = load_state_dict(tmp_path / "one" / rel)
        b, meta_b = load_state_dict(tmp_path / "two" / rel)
        assert meta_a == meta_b
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_scoring_chunks_fit_the_activation_budget_and_change_no_number():
    """Scoring picks how many examples to run at once from the largest activation (here the first conv's
    8 x 12 x 12 per example, times 3 networks), and any chunking gives the same accuracies and losses."""
    from synthnet.evaluation.scoring import ACTIVATION_BUDGET, accuracy_and_loss, examples_per_chunk, predictions
    from synthnet.evaluation.scoring import stack_state_dicts

    torch.manual_seed(0)
    model = build_target({"name": "cnn", "channels": [8, 4], "kernel_size": 3, "padding": 1, "pool": 2, "fc": []},
                         (1, 12, 12), 5)
    stacked = stack_state_dicts([build_target({"name": "cnn", "channels": [8, 4], "kernel_size": 3, "padding": 1,
                                               "pool": 2, "fc": []}, (1, 12, 12), 5).state_dict() for _ in range(3)])
    inputs, labels = torch.randn(300, 1, 12, 12), torch.randint(0, 5, (300,))
    assert examples_per_chunk(model, stacked, inputs) == min(2048, ACTIVATION_BUDGET // (8 * 12 * 12 * 3))
    assert examples_per_chunk(model, stacked, inputs, most=10 ** 9) == ACTIVATION_BUDGET // (8 * 12 * 12 * 3)
    whole = accuracy_and_loss(model, stacked, inputs, labels, chunk_size=300)
    for chunk in (None, 7, 64):
        got = accuracy_and_loss(model, stacked, inputs, labels, chunk_size=chunk)
        assert torch.equal(got[0], whole[0]) and torch.allclose(got[1], whole[1], rtol=1e-6)
        assert torch.equal(predictions(model, stacked, inputs, chunk), predictions(model, stacked, inputs, 300))
