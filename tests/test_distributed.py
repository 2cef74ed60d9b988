"""Generator training on torch.distributed (two CPU processes, gloo): the data-parallel run equals a single
process on the same global batch, writes one loadable generator and one metrics log; commands that run in
one process refuse torchrun in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from synthnet.cli import main
from synthnet.storage import load_state_dict

# imitation (method.imitation, trained first) then the task loss, 4 steps each, a global batch of 8 pairs
# and 4 inits; the MoE balance loss (a product of two batch means, per rank under DDP) is off so that the
# two runs must agree to float tolerance
ARGS = ["experiment=smoke_task", "method.steps=4", "method.eval_every=2", "method.inits_per_step=4",
        "method.imitation.steps=4", "method.imitation.batch_size=8", "method.imitation.val_runs=1",
        "generator.balance_loss_weight=0", "target.hidden=[16]", "progress=false"]


def _train(prefix, root, zoo):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*prefix, "train", *ARGS, f"paths.root={root}", f"paths.checkpoints_dir={zoo}"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_two_process_training_equals_one_process_on_the_same_global_batch(tiny_zoo, tmp_path):
    zoo = tiny_zoo["checkpoints_dir"]
    _train([sys.executable, "-m", "synthnet"], tmp_path / "one", zoo)
    two = _train([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                  "-m", "synthnet"], tmp_path / "two", zoo)
    assert two.stdout.count("train: perceiver_moe (task)") == 1  # rank 0 alone reports
    for method in ("imitation", "task"):
        name = f"digits-mlp/generators/perceiver_moe-{method}.safetensors"
        a, meta_a = load_state_dict(tmp_path / "one" / name)
        b, meta_b = load_state_dict(tmp_path / "two" / name)
        assert a.keys() == b.keys()
        worst = max(float((a[k] - b[k]).abs().max()) for k in a)
        assert worst < 1e-5, (method, worst)
        assert any(not torch.equal(a[k], b[k]) for k in a) or worst == 0.0
        assert meta_a["fingerprint"] == meta_b["fingerprint"] and meta_b["finished"]
        logs = [(tmp_path / run / name).with_name(f"perceiver_moe-{method}.metrics.jsonl") for run in ("one", "two")]
        records = [[json.loads(line) for line in log.read_text().splitlines()] for log in logs]
        assert len(records[0]) == len(records[1])  # one log, written once, not once per rank
        losses = [[r["loss"] for r in rs if "loss" in r] for rs in records]
        assert all(abs(x - y) < 1e-4 for x, y in zip(*losses))  # logged losses are the global batch's
    from synthnet.generators import load_generator
    assert load_generator(tmp_path / "two" / "digits-mlp/generators/perceiver_moe-task.safetensors").model
    assert not list((tmp_path / "two").rglob("*.tmp"))


def test_one_process_commands_refuse_torchrun(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["pipeline", f"paths.root={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "`synthnet pipeline` runs in one process" in err and len(err.splitlines()) == 1
    assert not any(tmp_path.iterdir())


def _run(prefix, *args):
    done = subprocess.run([*prefix, *args], env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_generate_and_evaluate_split_their_seeds_across_two_processes(tiny_zoo, tmp_path):
    """Each process generates / trains the twins of its share of the seeds; rank 0 gathers: the files and
    every number of the report (timings aside) equal a one-process run's, and they are written once."""
    one, two = [sys.executable, "-m", "synthnet"], [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc_per_node=2", "-m", "synthnet"]
    args = ["experiment=smoke", f"paths.root={tmp_path}", f"paths.checkpoints_dir={tiny_zoo['checkpoints_dir']}",
            "target.hidden=[16]", "progress=false"]
    _run(one, "train", *args)
    base = tmp_path / "digits-mlp"
    outputs, reports = {}, {}
    for name, prefix in (("one", one), ("two", two)):
        outputs[name] = _run(prefix, "generate", *args, "generate.count=5", "generate.steps=2")
        (base / "generated").rename(tmp_path / f"generated-{name}")
        outputs[name] += _run(prefix, "evaluate", *args, "evaluate.count=3")
        reports[name] = json.loads((base / "reports" / "report.json").read_text())
        (base / "reports").rename(tmp_path / f"reports-{name}")
    table = [line for line in outputs["two"].splitlines() if line.startswith("| ")]
    assert table and table[:4] == [line for line in outputs["one"].splitlines() if line.startswith("| ")][:4]
    assert outputs["two"].count("generate: 5 networks") == 1 and outputs["two"].count("evaluate: mlp") == 1
    files = sorted(p.relative_to(tmp_path / "generated-one") for p in (tmp_path / "generated-one").rglob("*.*"))
    assert len(files) == 5
    assert files == sorted(p.relative_to(tmp_path / "generated-two") for p in (tmp_path / "generated-two").rglob("*.*"))
    for f in files:
        a, meta_a = load_state_dict(tmp_path / "generated-one" / f)
        b, meta_b = load_state_dict(tmp_path / "generated-two" / f)
        worst = max(float((a[k] - b[k]).abs().max()) for k in a)  # batches of 5 vs 3 and 2: float rounding only
        assert worst < 1e-5 and meta_a == meta_b, (f, worst)
    twins = [reports[name]["twins"] for name in ("one", "two")]
    assert twins[0]["test_accuracy"] == twins[1]["test_accuracy"]
    for key in ("accuracy_ratio", "novelty_ratio", "diversity_ratio"):
        got = [reports[name]["generators"]["perceiver_moe-imitation"]["headline"][key] for name in ("one", "two")]
        assert abs(got[0] - got[1]) < 1e-9, (key, got)
    assert not list(tmp_path.rglob("*.tmp"))


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    from synthnet import distributed

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    rows = distributed.shard(torch.arange(8))
    model = torch.nn.Linear(2, 1, bias=False)
    model.weight.grad = torch.full((1, 2), float(rank + 1))  # rank 0: 1, rank 1: 2 -> mean 1.5
    distributed.average_gradients(model)
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"rows": rows.tolist(), "grad": model.weight.grad.tolist(),
                   "mean": distributed.mean(float(rank)), "broadcast": distributed.broadcast_float(rank + 7.0)}, f)
    dist.destroy_process_group()


def test_each_rank_takes_its_own_share_and_gradients_are_averaged(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"out.{rank}").read_text()) for rank in range(2)]
    assert results[0]["rows"] == [0, 2, 4, 6] and results[1]["rows"] == [1, 3, 5, 7]
    assert all(r["grad"] == [[1.5, 1.5]] and r["mean"] == 0.5 and r["broadcast"] == 7.0 for r in results)


def test_local_device_gives_each_process_its_own_accelerator(monkeypatch):
    """Under torchrun an accelerator named without an index becomes LOCAL_RANK's own when there are several;
    an explicit index, a single device or the CPU are left as named."""
    from unittest import mock

    from synthnet.distributed import local_device

    monkeypatch.setenv("LOCAL_RANK", "1")
    assert local_device("cpu") == torch.device("cpu")
    with mock.patch("torch.cuda.device_count", return_value=2):
        assert local_device("cuda") == torch.device("cuda", 1)
        assert local_device("cuda:0") == torch.device("cuda", 0)
    with mock.patch("torch.cuda.device_count", return_value=1):
        assert local_device("cuda") == torch.device("cuda")
