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
    (["zoo", "zoo.runs=0"], "zoo.runs must be >= 1, got 0"),
    (["zoo", "zoo.epochs=-3"], "zoo.epochs must be in [1, 10000], got -3"),
    (["zoo", "zoo.runs=two"], "zoo.runs must be an integer, got 'two'"),
    (["zoo", "zoo.optimizer=lbfgs"], "zoo.optimizer must be one of"),
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
    assert all(row["count"] == 3 for row in report["generators"].values())  # experiment=smoke: 3 per row
    for row in [*report["generators"].values(), report["twins"]]:  # int8 keeps accuracy, int4 is reported too
        assert set(row["quantized_test_accuracy"]) == {"int8", "int4"}
        assert abs(row["quantized_test_accuracy"]["int8"]["mean"] - row["test_accuracy"]["mean"]) < 0.05
    assert "- quantized test accuracy (round to nearest" in (target_dir / "reports" / "report.md").read_text()

    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    from synthnet.generation import generate_networks, target_layout
    from synthnet.generators import load_generator
    from synthnet.storage import read_metadata
    from synthnet.targets import build_target
    from synthnet.tasks import build_task

    imitation = read_metadata(target_dir / "generators" / "perceiver_moe-imitation.safetensors")
    task_header = read_metadata(target_dir / "generators" / "perceiver_moe-task.safetensors")
    assert imitation["finished"] is True and task_header["finished"] is True and task_header["method"] == "task"
    assert task_header["source_fingerprint"] == imitation["fingerprint"]  # the task loss started from that file
    steps = [json.loads(line)["step"] for line in
             (target_dir / "generators" / "perceiver_moe-task.metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 6

    # the generated files are plain safetensors of the target, reproducible from their seeds, and their
    # headers' accuracy is the network's
    files = sorted((target_dir / "generated" / "perceiver_moe-task").glob("*.safetensors"))
    task = build_task({"name": "digits"}, tmp_path / "data")
    target = task_header["target_config"]
    model = build_target(target, task.input_shape, task.num_classes)
    loaded = load_generator(target_dir / "generators" / "perceiver_moe-task.safetensors")
    _, layout = target_layout(target, task.input_shape, task.num_classes, loaded.chunk_size)
    seeds = [int(read_metadata(f)["seed"]) for f in files]
    again = generate_networks(loaded.model, layout, target, task.input_shape, task.num_classes, seeds,
                              int(read_metadata(files[0])["steps"]))
    for i, path in enumerate(files):
        weights = load_file(path)
        model.load_state_dict(weights)
        assert all(torch.allclose(weights[k], again.state_dicts[-1][k][i], atol=1e-6) for k in weights)
        with torch.no_grad():
            accuracy = float((model(task.x_test).argmax(1) == task.y_test).float().mean())
        with safe_open(path, "pt") as handle:
            assert json.loads(handle.metadata()["test_accuracy"]) == pytest.approx(accuracy, abs=1e-6)


def test_pipeline_rejects_unknown_stage(tmp_path, capsys):
    code, err = _run(capsys, "pipeline", "pipeline.stages=[zoo,fly]", f"paths.root={tmp_path}")
    assert code == 2 and "pipeline.stages must be one of zoo, train, generate, evaluate, got ['zoo', 'fly']" in err
    assert not any(tmp_path.iterdir())
