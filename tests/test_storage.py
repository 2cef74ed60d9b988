"""Storage: safetensors with metadata, validated loads, atomic writes, plain-safetensors compatibility."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from synthnet.errors import SynthNetError
from synthnet.storage import load_state_dict, read_metadata, save_state_dict
from synthnet.targets import build_target


@pytest.fixture()
def model():
    return build_target({"name": "mlp", "hidden": [8]}, (1, 8, 8), 10)


def test_round_trip_with_metadata_and_plain_loading(tmp_path, model):
    path = tmp_path / "w.safetensors"
    save_state_dict(path, model.state_dict(), {"target": "mlp", "step": 3, "target_config": {"hidden": [8]}})
    assert read_metadata(path) == {"target": "mlp", "step": 3, "target_config": {"hidden": [8]}}
    tensors, metadata = load_state_dict(path, model)
    assert metadata["step"] == 3
    fresh = build_target({"name": "mlp", "hidden": [8]}, (1, 8, 8), 10)
    fresh.load_state_dict(load_file(str(path)), strict=True)
    assert all(torch.equal(fresh.state_dict()[k], model.state_dict()[k]) for k in tensors)
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temp files left
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as readable as a plain open() makes it


def test_missing_extra_and_wrong_shape_name_the_tensor(tmp_path, model):
    state = dict(model.state_dict())
    path = tmp_path / "w.safetensors"
    save_state_dict(path, {k: v for k, v in state.items() if k != "layers.1.bias"}, {})
    with pytest.raises(SynthNetError, match="'layers.1.bias' missing"):
        load_state_dict(path, model)
    save_state_dict(path, {**state, "layers.9.weight": torch.zeros(2)}, {})
    with pytest.raises(SynthNetError, match="unexpected tensor 'layers.9.weight'"):
        load_state_dict(path, model)
    save_state_dict(path, {**state, "layers.0.weight": torch.zeros(8, 63)}, {})
    with pytest.raises(SynthNetError, match=r"'layers.0.weight'.*\(8, 63\).*\(8, 64\)"):
        load_state_dict(path, model)


def test_nan_is_refused_on_save_and_on_load(tmp_path, model):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["layers.0.bias"][0] = float("nan")
    with pytest.raises(SynthNetError, match="'layers.0.bias'.*NaN"):
        save_state_dict(tmp_path / "x.safetensors", state, {})
    assert not (tmp_path / "x.safetensors").exists()
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "y.safetensors"))
    with pytest.raises(SynthNetError, match="NaN or Inf"):
        load_state_dict(tmp_path / "y.safetensors", model)


def test_truncated_and_corrupt_files_name_the_file(tmp_path, model):
    path = tmp_path / "w.safetensors"
    save_state_dict(path, model.state_dict(), {"step": 1})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SynthNetError, match="corrupt or truncated.*w.safetensors"):
        load_state_dict(path, model)
    path.write_bytes(b"\x00" * 3)
    with pytest.raises(SynthNetError, match="corrupt or truncated.*w.safetensors"):
        read_metadata(path)
    with pytest.raises(SynthNetError, match="no such file"):
        load_state_dict(tmp_path / "absent.safetensors")


def test_failed_write_keeps_the_old_file(tmp_path, model, monkeypatch):
    path = tmp_path / "w.safetensors"
    save_state_dict(path, model.state_dict(), {"step": 1})
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("synthnet.storage.save_file", boom)
    with pytest.raises(OSError):
        save_state_dict(path, model.state_dict(), {"step": 2})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_a_file_of_another_dtype_is_refused_not_cast(tmp_path, model):
    path = tmp_path / "w.safetensors"
    for dtype in (torch.float64, torch.int8, torch.bool):
        save_state_dict(path, {k: v.to(dtype) for k, v in model.state_dict().items()}, {})
        with pytest.raises(SynthNetError, match=f"is {str(dtype).removeprefix('torch.')}, the target expects float32"):
            load_state_dict(path, model)


def test_read_errors_name_the_real_cause(tmp_path, model):
    loop = tmp_path / "loop.safetensors"
    os.symlink(loop, loop)
    with pytest.raises(SynthNetError, match="symlink loop"):
        load_state_dict(loop)
    folder = tmp_path / "folder.safetensors"
    folder.mkdir()
    with pytest.raises(SynthNetError, match="is a directory"):
        read_metadata(folder)
    broken = tmp_path / "broken.safetensors"
    os.symlink(tmp_path / "nowhere", broken)
    with pytest.raises(SynthNetError, match="no such file|broken symlink"):
        read_metadata(broken)
    if os.geteuid() != 0:  # root reads mode-000 files anyway
        locked = tmp_path / "locked.safetensors"
        save_state_dict(locked, model.state_dict(), {})
        locked.chmod(0)
        with pytest.raises(SynthNetError, match="permission denied"):
            read_metadata(locked)


def test_deeply_nested_header_is_refused_in_one_line(tmp_path, model):
    from safetensors.torch import save_file

    path = tmp_path / "deep.safetensors"
    save_file(model.state_dict(), str(path), metadata={"recipe": "[" * 50_000 + "]" * 50_000})
    with pytest.raises(SynthNetError, match="nested deeper than"):
        read_metadata(path)


def test_stale_temp_files_of_a_killed_save_are_removed_by_the_next(tmp_path, model):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(done.stdout)  # a process that has exited
    path = tmp_path / "w.safetensors"
    stale = tmp_path / f".w.safetensors.{dead}.abc123.tmp"
    stale.write_bytes(b"half a file")
    mine = tmp_path / f".w.safetensors.{os.getpid()}.def456.tmp"  # a save in progress (this process)
    mine.write_bytes(b"in progress")
    other = tmp_path / f".v.safetensors.{dead}.abc123.tmp"  # another file's: not this save's business
    other.write_bytes(b"x")
    save_state_dict(path, model.state_dict(), {})
    assert not stale.exists() and mine.exists() and other.exists()
