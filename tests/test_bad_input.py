"""Bad input: untrusted headers, wrong dtypes, damaged zoo files and re-runs with other settings end in
one line and exit 2, and no file a user made is changed or lost."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from synthnet.cli import main
from synthnet.storage import load_state_dict, read_metadata, save_state_dict


def _args(tiny_zoo, root, *extra):
    return ["experiment=smoke", f"paths.root={root}", f"paths.checkpoints_dir={tiny_zoo['checkpoints_dir']}",
            "target.hidden=[16]", "progress=false", *extra]


def _snapshot(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line_error(capsys, *fragments):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


@pytest.fixture(scope="module")
def trained(tiny_zoo, tmp_path_factory):
    """A finished smoke generator and 4 networks generated with it."""
    root = tmp_path_factory.mktemp("trained")
    assert main(["train", *_args(tiny_zoo, root)]) == 0
    assert main(["generate", *_args(tiny_zoo, root)]) == 0
    return root


def _tampered(trained, tmp_path, edit_tensors=None, edit_header=None):
    """A copy of the trained root whose generator file has edited tensors or header."""
    root = tmp_path / "copy"
    shutil.copytree(trained, root)
    path = root / "digits-mlp" / "generators" / "perceiver_moe-imitation.safetensors"
    tensors, meta = load_state_dict(path)
    tensors = edit_tensors(tensors) if edit_tensors else tensors
    meta = edit_header(meta) if edit_header else meta
    save_state_dict(path, tensors, meta)
    return root, path


@pytest.mark.parametrize("case, fragment", [
    ("int8", "is int8, its header's generator_config expects float32"),
    ("bool", "is bool, its header's generator_config expects float32"),
    ("no chunk_size", "'chunk_size' must be an integer"),
    ("no target_config", "'target_config' must be a config with a name"),
    ("no task_config", "'task_config' must be a config with a name"),
    ("generator_config string", "'generator_config' must be a config with a name"),
    ("huge d_model", "generator_config 'd_model' = 1000000 is outside"),
    ("large d_model", "its header's generator_config expects"),
    ("huge num_experts", "generator_config 'num_experts' = 10000000 is outside"),
    ("bias_chunk string", "generator_config 'bias_chunk' = 'yes' is not true or false"),
    ("extra tensor", "unexpected tensor 'surplus'"),
    ("missing tensor", "missing"),
    ("transposed tensor", "has shape"),
])
def test_a_tampered_generator_is_refused_and_nothing_is_overwritten(tiny_zoo, trained, tmp_path, capsys, case,
                                                                    fragment):
    def tensors(t):
        t = dict(t)
        first = sorted(k for k in t if t[k].dim() == 2)[0]
        if case == "int8":
            t = {k: (v * 10).to(torch.int8) for k, v in t.items()}
        elif case == "bool":
            t = {k: v > 0 for k, v in t.items()}
        elif case == "extra tensor":
            t["surplus"] = torch.zeros(3)
        elif case == "missing tensor":
            t.pop(first)
        elif case == "transposed tensor":
            t[first] = t[first].T.contiguous() if t[first].shape[0] != t[first].shape[1] else t[first][:, :1]
        return t

    def header(m):
        m = dict(m)
        if case.startswith("no "):
            m.pop(case[3:])
        elif case == "generator_config string":
            m["generator_config"] = "perceiver_moe"
        elif case == "huge d_model":
            m["generator_config"] = {**m["generator_config"], "d_model": 1_000_000}
        elif case == "large d_model":  # within bounds: built on the meta device, then compared
            m["generator_config"] = {**m["generator_config"], "d_model": 4096}
        elif case == "huge num_experts":
            m["generator_config"] = {**m["generator_config"], "num_experts": 10_000_000}
        elif case == "bias_chunk string":
            m["generator_config"] = {**m["generator_config"], "bias_chunk": "yes"}
        return m

    root, _ = _tampered(trained, tmp_path, tensors, header)
    before = _snapshot(root)
    capsys.readouterr()
    for command in (["generate"], ["evaluate", "evaluate.count=2"]):
        assert main([command[0], *_args(tiny_zoo, root), *command[1:]]) == 2, (case, command)
        _one_line_error(capsys, fragment)
    assert _snapshot(root) == before  # the 4 good networks are still there, unchanged; no report written


@pytest.mark.parametrize("case, fragment", [
    ("no step", "'step' must be an integer"),
    ("step abc", "'step' must be an integer"),
    ("no val_accuracy", "'val_accuracy' must be a number"),
    ("unknown recipe field", "unknown recipe field 'warp'"),
    ("epochs 1e7", "recipe epochs 10000000 is over"),
    ("float64", "is float64, the target expects float32"),
])
def test_a_bad_zoo_checkpoint_is_a_one_line_error(tiny_zoo, tmp_path, capsys, case, fragment):
    zoo = tmp_path / "zoo"
    shutil.copytree(tiny_zoo["checkpoints_dir"], zoo)
    final = sorted((zoo / sorted(p.name for p in zoo.iterdir())[0]).glob("*.safetensors"))[-1]
    tensors, meta = load_state_dict(final)
    if case == "no step":
        meta.pop("step")
    elif case == "step abc":
        meta["step"] = "abc"
    elif case == "no val_accuracy":
        meta.pop("val_accuracy")
    elif case == "unknown recipe field":
        meta["recipe"] = {**meta["recipe"], "warp": 9}
    elif case == "epochs 1e7":
        meta["recipe"] = {**meta["recipe"], "epochs": 10_000_000}
    elif case == "float64":
        tensors = {k: v.double() for k, v in tensors.items()}
    save_state_dict(final, tensors, meta)
    before = _snapshot(zoo)
    capsys.readouterr()
    common = ["experiment=smoke", f"paths.root={tmp_path}", f"paths.checkpoints_dir={zoo}", "target.hidden=[16]",
              "progress=false"]
    assert main(["evaluate", *common, "evaluate.generators=[]", "evaluate.count=2"]) == 2
    _one_line_error(capsys, fragment)
    assert main(["train", *common]) == 2
    _one_line_error(capsys, fragment)
    assert _snapshot(zoo) == before


def test_zoo_retrains_a_run_whose_intermediate_checkpoint_was_cut_short(tmp_path, caplog):
    common = ["zoo", "experiment=smoke", f"paths.root={tmp_path}", "progress=false"]
    assert main(common) == 0
    checkpoints = tmp_path / "digits-mlp" / "checkpoints"
    runs = sorted(p for p in checkpoints.iterdir() if p.is_dir())
    middle = sorted(runs[0].glob("*.safetensors"))[1]
    good = middle.read_bytes()
    middle.write_bytes(good[: len(good) // 2])  # a killed write that left half a file
    caplog.clear()
    caplog.set_level("INFO", logger="synthnet")
    assert main(common) == 0
    assert "zoo run 0 is damaged" in caplog.text and "skipped 1 completed runs" in caplog.text
    original = tmp_path / "original.safetensors"
    original.write_bytes(good)
    again, meta = load_state_dict(middle)
    first, first_meta = load_state_dict(original)
    assert meta["step"] == first_meta["step"]  # trained again (alone now, so equal up to float rounding)
    assert all(torch.allclose(again[k], first[k], atol=1e-5) for k in first)
    assert main(["train", "experiment=smoke", f"paths.root={tmp_path}", "progress=false"]) == 0


def test_retraining_with_other_settings_never_replaces_a_generator_silently(tiny_zoo, trained, tmp_path, capsys,
                                                                          monkeypatch):
    root = tmp_path / "copy"
    shutil.copytree(trained, root)
    generators = root / "digits-mlp" / "generators"
    before = _snapshot(generators)
    capsys.readouterr()
    assert main(["train", *_args(tiny_zoo, root, "method.lr=0.01")]) == 2
    _one_line_error(capsys, "trained with other settings", "train.output=", "train.overwrite=true")
    assert _snapshot(generators) == before  # generator and metrics log untouched
    beside = generators / "lr001.safetensors"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # a bare file name goes beside the generators, not into the working directory
    assert main(["train", *_args(tiny_zoo, root, "method.lr=0.01", "train.output=lr001.safetensors")]) == 0
    assert beside.exists() and all(_snapshot(generators)[p] == data for p, data in before.items())
    assert not list(elsewhere.iterdir())
    assert main(["train", *_args(tiny_zoo, root, "method.lr=0.01", "train.overwrite=true")]) == 0
    path = generators / "perceiver_moe-imitation.safetensors"
    assert read_metadata(path)["method_config"]["lr"] == 0.01


@pytest.mark.parametrize("args, fragment", [
    (["zoo", "+zoo.nope=1"], "unknown config key 'zoo.nope'"),
    (["zoo", "zoo.nope=1"], "unknown config key 'zoo.nope'"),
    (["zoo", "zoo.lr=-1"], "zoo.lr must be in (0, 100], got -1"),
    (["zoo", "generator.d_model=1e6"], "generator.d_model must be an integer, got '1000000.0'"),
    (["zoo", "task.val_fraction=1.5"], "task.val_fraction must be in (0, 1), got 1.5"),
    (["zoo", "target.hidden=[0]"], "target.hidden must be in [1, 65536], got [0]"),
    (["zoo", "method=grpo"], "unknown config key 'method.steps' (set by experiment/smoke.yaml)"),
    (["zoo", "method.gap=sideways"], "method.gap must be one of any, adjacent, got 'sideways'"),
    (["zoo", "device=nope"], "is not a device"),
    (["zoo", "device=cuda:7"], "CUDA device(s); use device=cpu"),
    (["zoo", "zoo.first_seed=-1"], "zoo.first_seed must be >= 0, got -1"),
    (["zoo", "zoo.lr=abc"], "zoo.lr must be a number, got 'abc'"),
    (["zoo", "zoo.batch_size=abc"], "zoo.batch_size must be an integer, got 'abc'"),
    (["zoo", "target.hidden=abc"], "target.hidden must be a list"),
    (["zoo", "zoo.runs=10000000", "zoo.epochs=2"], "needs about"),
    (["zoo", "paths.root="], "paths.root is empty"),
    (["generate", "generate.noise_scale=abc"], "generate.noise_scale must be a number, got 'abc'"),
    (["generate", "generate.count=10000000"], "needs about"),
    (["generate", "generate.steps=10000000"], "needs about"),
    (["evaluate", "evaluate.count=10000000"], "needs about"),
    (["evaluate", "evaluate.architectures=[[65536,65536]]"], "evaluate.architectures (1 architectures"),
    (["evaluate", "evaluate.architectures=[[16,abc]]"], "neither a list of positive widths"),
])
def test_bad_values_and_impossible_sizes_end_in_one_line_before_any_work(tiny_zoo, trained, tmp_path, capsys, args,
                                                                         fragment):
    root = tmp_path / "copy"
    shutil.copytree(trained, root)
    before = _snapshot(root)
    overrides = _args(tiny_zoo, root) if args[0] != "zoo" else ["experiment=smoke", f"paths.root={root}",
                                                                  "progress=false"]
    if any(a.startswith("paths.root=") for a in args):
        overrides = [o for o in overrides if not o.startswith("paths.root=")]
    capsys.readouterr()
    assert main([args[0], *overrides, *args[1:]]) == 2
    _one_line_error(capsys, fragment)
    assert _snapshot(root) == before


def test_a_file_or_read_only_folder_as_root_is_named(tmp_path, capsys):
    import os

    a_file = tmp_path / "root.txt"
    a_file.write_text("not a folder")
    assert main(["zoo", "experiment=smoke", f"paths.root={a_file}", "progress=false"]) == 2
    _one_line_error(capsys, "is a file, not a folder")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        assert main(["zoo", "experiment=smoke", f"paths.root={locked / 'sub'}", "progress=false"]) == 2
        _one_line_error(capsys, "cannot be written")


@pytest.mark.parametrize("method", ["imitation", "task"])
def test_kill_9_mid_training_then_rerun_equals_an_uninterrupted_run(tiny_zoo, tmp_path, method):
    """SIGKILL while `synthnet train` runs (after a resume state was saved), then the same command again:
    the generator file equals an uninterrupted run's, tensor for tensor and header for header, and no
    temp file is left anywhere under the root."""
    import os
    import signal
    import subprocess
    import sys
    import time

    def command(root):
        extra = ["method.steps=24", "method.save_every=2", "method.eval_every=4", "method.log_every=4"]
        if method == "task":
            extra = ["experiment=smoke_task", "method.steps=12", "method.save_every=2", "method.eval_every=4",
                     "method.inits_per_step=2", "method.batch_size=32", "method.log_every=4"]
        args = _args(tiny_zoo, root, *extra)
        if method == "task":
            args = [a for a in args if a != "experiment=smoke"]
        return [sys.executable, "-m", "synthnet", "train", *args]

    serial, killed = tmp_path / "serial", tmp_path / "killed"
    done = subprocess.run(command(serial), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    name = f"perceiver_moe-{method}.safetensors"
    resume = killed / "digits-mlp" / "generators" / "resume" / name
    process = subprocess.Popen(command(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not resume.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed: make it longer"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / "digits-mlp" / "generators" / name).exists()  # nothing half-finished was published
    done = subprocess.run(command(killed), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    expected, expected_meta = load_state_dict(serial / "digits-mlp" / "generators" / name)
    got, got_meta = load_state_dict(killed / "digits-mlp" / "generators" / name)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    def comparable(meta):  # wall-clock timings differ between any two runs; paths name each run's root
        meta = json.loads(json.dumps(meta).replace(str(serial), "<root>").replace(str(killed), "<root>"))
        meta["metrics"] = {k: v for k, v in meta.get("metrics", {}).items() if "second" not in k and "_per_s" not in k}
        return meta

    assert comparable(expected_meta) == comparable(got_meta)
    assert not [p for p in killed.rglob("*") if ".tmp" in p.name]
    assert not resume.exists()  # removed once the training finished
