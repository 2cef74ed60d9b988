"""Tasks: deterministic, disjoint splits; MNIST-1D leaves global RNGs alone; the IDX reader."""

from __future__ import annotations

import gzip
import random
import struct

import numpy as np
import pytest
import torch

from synthnet.errors import SynthNetError
from synthnet.tasks import build_task
from synthnet.tasks.mnist import read_idx


def _rows(x: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in x.flatten(1)}


@pytest.mark.parametrize("name", ["digits", "mnist1d"])
def test_splits_are_deterministic_and_disjoint(name):
    first, second = build_task({"name": name}, "unused"), build_task({"name": name}, "unused")
    for split in ("train", "val", "test"):
        x1, y1 = first.split(split)
        x2, y2 = second.split(split)
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
        assert x1.shape[1:] == first.input_shape and x1.dtype == torch.float32 and y1.dtype == torch.int64
    train, val, test = _rows(first.x_train), _rows(first.x_val), _rows(first.x_test)
    assert not (train & val) and not (train & test) and not (val & test)
    assert len(first.y_val) > 0 and len(first.y_test) > 0


def test_split_seed_changes_the_split():
    a = build_task({"name": "digits", "split_seed": 0}, "unused")
    b = build_task({"name": "digits", "split_seed": 1}, "unused")
    assert not torch.equal(a.x_test, b.x_test)


def test_mnist1d_does_not_disturb_global_rng():
    np.random.seed(123)
    random.seed(123)
    expected_np, expected_py = np.random.rand(), random.random()
    np.random.seed(123)
    random.seed(123)
    task = build_task({"name": "mnist1d"}, "unused")
    assert np.random.rand() == expected_np and random.random() == expected_py
    assert task.input_shape == (1, 40) and len(task.y_train) + len(task.y_val) == 4000 and len(task.y_test) == 1000


def _write_idx(path, array: np.ndarray, compress: bool) -> None:
    codes = {np.dtype(np.uint8): 0x08}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.tobytes()
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def _write_mnist(directory, compress: bool, n_train=60, n_test=20):
    rng = np.random.default_rng(0)
    suffix = ".gz" if compress else ""
    _write_idx(directory / f"train-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8), compress)
    _write_idx(directory / f"train-labels-idx1-ubyte{suffix}", rng.integers(0, 10, n_train, dtype=np.uint8), compress)
    _write_idx(directory / f"t10k-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8), compress)
    _write_idx(directory / f"t10k-labels-idx1-ubyte{suffix}", rng.integers(0, 10, n_test, dtype=np.uint8), compress)


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_idx_loader(tmp_path, compress):
    _write_mnist(tmp_path, compress)
    raw = read_idx(tmp_path / ("train-images-idx3-ubyte" + (".gz" if compress else "")))
    assert raw.shape == (60, 28, 28) and raw.dtype == np.uint8
    task = build_task({"name": "mnist", "dir": str(tmp_path), "val_fraction": 0.25, "standardize": False}, "unused")
    assert task.input_shape == (1, 28, 28)
    assert (len(task.y_train), len(task.y_val), len(task.y_test)) == (45, 15, 20)
    assert float(task.x_train.max()) <= 1.0 and float(task.x_train.min()) >= 0.0
    expected = torch.as_tensor(raw[:].astype(np.float32) / 255.0)
    assert _rows(task.x_train) | _rows(task.x_val) == _rows(expected)


def test_mnist_is_standardized_with_the_training_split_alone(tmp_path):
    _write_mnist(tmp_path, False)
    raw = build_task({"name": "mnist", "dir": str(tmp_path), "val_fraction": 0.25, "standardize": False}, "unused")
    task = build_task({"name": "mnist", "dir": str(tmp_path), "val_fraction": 0.25}, "unused")  # the default
    mean, std = float(raw.x_train.mean()), float(raw.x_train.std(correction=0))
    assert abs(float(task.x_train.mean())) < 1e-4 and abs(float(task.x_train.std()) - 1) < 1e-3
    # validation and test are moved by the training split's statistics, not their own
    for split in ("x_train", "x_val", "x_test"):
        torch.testing.assert_close(getattr(task, split), (getattr(raw, split) - mean) / std)
    assert abs(float(task.x_test.mean())) > 1e-3  # its own mean would have made this 0
    assert torch.equal(task.y_val, raw.y_val) and task.x_val.dtype == torch.float32


def test_mnist_missing_files_are_named(tmp_path):
    with pytest.raises(SynthNetError, match="t10k-labels-idx1-ubyte"):
        _write_mnist(tmp_path, False)
        (tmp_path / "t10k-labels-idx1-ubyte").unlink()
        build_task({"name": "mnist", "dir": str(tmp_path)}, "unused")


def test_idx_truncated_and_bad_magic(tmp_path):
    _write_mnist(tmp_path, False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(SynthNetError, match="data bytes"):
        read_idx(path)
    path.write_bytes(b"\x12\x34\x56\x78rest")
    with pytest.raises(SynthNetError, match="not an IDX file"):
        read_idx(path)


def test_unknown_task_lists_available():
    with pytest.raises(SynthNetError, match="available: digits, mnist, mnist1d"):
        build_task({"name": "cifar"}, "unused")


def test_failed_download_is_one_clear_error_and_leaves_no_partial_file(tmp_path):
    from synthnet.tasks.mnist import download

    with pytest.raises(SynthNetError, match="could not download http://127.0.0.1:9/train-images-idx3-ubyte.gz"):
        download(tmp_path / "mnist", "http://127.0.0.1:9")
    assert list((tmp_path / "mnist").iterdir()) == []
