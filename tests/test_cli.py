"""The CLI: help, config composition, one-line errors that leave files alone, a zoo smoke run."""

from __future__ import annotations

import subprocess
import sys

import pytest

from synthnet.cli import compose, config_groups, main


def test_help_lists_commands_and_groups(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "zoo" in out and "target: cnn, mlp, poc_cnn" in out and "task: digits, mnist, mnist1d" in out


@pytest.mark.parametrize("group,option", [(g, o) for g, options in config_groups().items() for o in options])
def test_every_config_option_composes(group, option):
    cfg = compose([f"{group}={option}"])
    if group in ("target", "task", "generator", "method", "reward"):
        assert cfg[group]["name"] == option
    assert cfg.paths.checkpoints_dir.endswith("/checkpoints")


def _run(capsys, *args) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("args,message", [
    (["zoo", "target=resnet"], "unknown target 'resnet'; available: cnn, mlp, poc_cnn"),
    (["zoo", "task=cifar"], "unknown task 'cifar'; available: digits, mnist, mnist1d"),
    (["zoo", "target=poc_cnn"], "poc_cnn needs 1x28x28 images"),
    (["zoo", "target=cnn", "task=mnist1d", "target.dims=2"], "cnn with dims=2 cannot run on a 1-D task"),
    (["zoo", "zoo.runs=0"], "zoo.runs must be a positive integer, got 0"),
    (["zoo", "zoo.epochs=-3"], "zoo.epochs must be a positive integer, got -3"),
    (["zoo", "zoo.runs=two"], "zoo.runs must be a positive integer, got 'two'"),
    (["zoo", "zoo.optimizer=lbfgs"], "unknown zoo.optimizer 'lbfgs'"),
    (["zoo", "no_such_key=1"], "bad config override"),
    (["fly"], "unknown command 'fly'"),
])
def test_bad_input_is_one_line_nonzero_and_touches_nothing(tmp_path, capsys, args, message):
    existing = tmp_path / "digits-mlp" / "checkpoints" / "keep.txt"
    existing.parent.mkdir(parents=True)
    existing.write_text("precious")
    code, err = _run(capsys, *args, f"paths.root={tmp_path}")
    assert code != 0
    assert err.startswith("synthnet: error: ") and message in err and len(err.splitlines()) == 1
    assert existing.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["checkpoints", "digits-mlp", "keep.txt"]


def test_zoo_smoke_run_as_a_subprocess(tmp_path):
    done = subprocess.run([sys.executable, "-m", "synthnet", "zoo", "experiment=smoke", f"paths.root={tmp_path}",
                           "progress=false"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "final test accuracy" in done.stdout
    assert len(list((tmp_path / "digits-mlp" / "checkpoints").rglob("*.safetensors"))) == 2 * 3
    again = subprocess.run([sys.executable, "-m", "synthnet", "zoo", "experiment=smoke", f"paths.root={tmp_path}",
                            "progress=false"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "skipped 2 completed runs" in again.stderr


def test_pipeline_smoke_runs_every_stage_with_the_default_curriculum(tmp_path, capsys):
    import json

    assert main(["pipeline", "experiment=smoke_task", f"paths.root={tmp_path}", "progress=false"]) == 0
    out = capsys.readouterr().out
    for stage in ("zoo", "train", "generate", "evaluate"):
        assert f"== synthnet {stage} ==" in out
    target_dir = tmp_path / "digits-mlp"
    # train = imitation, then the task loss from it; generate uses the task-trained generator
    assert (target_dir / "generators" / "perceiver_moe-imitation.safetensors").is_file()
    assert (target_dir / "generators" / "perceiver_moe-task.safetensors").is_file()
    assert [p.name for p in (target_dir / "generated").iterdir()] == ["perceiver_moe-task"]
    report = json.loads((target_dir / "reports" / "report.json").read_text())
    assert set(report["generators"]) == {"perceiver_moe-imitation", "perceiver_moe-task"}
    assert (target_dir / "reports" / "report.md").is_file()


def test_pipeline_rejects_unknown_stage(tmp_path, capsys):
    code, err = _run(capsys, "pipeline", "pipeline.stages=[zoo,fly]", f"paths.root={tmp_path}")
    assert code == 2 and "unknown pipeline stage 'fly'" in err
    assert not any(tmp_path.iterdir())
