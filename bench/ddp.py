"""Generator training on torch.distributed: one process versus `torchrun --nproc_per_node=N`.

    python bench/ddp.py [--processes 2] [--imitation-steps 100] [--task-steps 40] [--out bench/results/ddp]

Builds a small digits-MLP zoo, then trains the same generator (default perceiver_moe, imitation then the
task loss, the same global batches) in one process and in N processes (gloo on CPU), through the CLI.
Prints, per method and process count: training steps/s (from the metrics log, the first window left out),
wall seconds of the command, and the largest |weight difference| of the written generator against the
one-process run. The Mixture-of-Experts balance loss is computed per rank (a product of batch means), so
with it on (the default) the runs differ slightly; tests/test_distributed.py checks equality with it off.
On a 2-core machine N processes share the same cores: no speed-up is expected, correctness is.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from synthnet.storage import load_state_dict


def cli(prefix: list[str], args: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run([*prefix, *args], env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"failed: {' '.join(args)}\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def steps_per_second(jsonl: Path) -> float:
    rates = [r["steps_per_s"] for r in map(json.loads, jsonl.read_text().splitlines()) if "steps_per_s" in r]
    rates = rates[1:] or rates  # the first window pays for start-up
    return sum(rates) / len(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--imitation-steps", type=int, default=100)
    parser.add_argument("--task-steps", type=int, default=40)
    parser.add_argument("--out", default="bench/results/ddp")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        zoo = Path(tmp) / "zoo"
        cli([sys.executable, "-m", "synthnet"], ["zoo", "zoo.runs=16", "zoo.epochs=5", f"paths.root={zoo}",
                                                 "progress=false"], cores)
        common = ["train", "method=task", f"method.steps={args.task_steps}", "method.eval_every=20",
                  "method.log_every=10", "method.inits_per_step=8", f"method.imitation.steps={args.imitation_steps}",
                  "method.imitation.log_every=10", "method.imitation.eval_every=1000", "method.imitation.batch_size=64",
                  f"paths.checkpoints_dir={zoo}/digits-mlp/checkpoints", "progress=false"]
        rows, generators = [], {}
        for processes in (1, args.processes):
            root = Path(tmp) / f"p{processes}"
            prefix = [sys.executable, "-m", "synthnet"] if processes == 1 else [
                sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                "-m", "synthnet"]
            wall = cli(prefix, [*common, f"paths.root={root}"], max(1, cores // processes))
            for method in ("imitation", "task"):
                path = root / "digits-mlp" / "generators" / f"perceiver_moe-{method}.safetensors"
                generators[processes, method] = load_state_dict(path)[0]
                rows.append((method, processes, steps_per_second(path.with_name(path.name.replace(
                    ".safetensors", ".metrics.jsonl"))), wall))
    lines = [f"# generator training, 1 vs {args.processes} processes ({cores} CPU cores, gloo)", "",
             "| method | processes | steps/s | command wall s (imitation + task) | max abs weight diff vs 1 process |",
             "|---|---|---|---|---|"]
    for method, processes, rate, wall in rows:
        one, this = generators[1, method], generators[processes, method]
        diff = max(float((one[k] - this[k]).abs().max()) for k in one)
        lines.append(f"| {method} | {processes} | {rate:.2f} | {wall:.1f} | {diff:.2e} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ddp.md").write_text(text)


if __name__ == "__main__":
    main()
