"""The README's main results table: the whole pipeline with fixed seeds on each setting.

For each setting (digits MLP, MNIST-1D MLP, MNIST-1D CNN; the PoC CNN on real MNIST with --mnist-dir) this runs, in-process through the
one CLI entry point, ``synthnet zoo``, ``synthnet train`` for each generator (imitation;
``--grpo`` adds GRPO fine-tuning of the first one) and ``synthnet evaluate``, then reads each
``report.json`` and writes one table between ``<!-- results:start -->`` and
``<!-- results:end -->`` in README.md, with the command that reproduces it and the machine it
ran on. ``--table-only`` rebuilds the table from existing reports. With ``--settings`` only those settings'
rows (and stage times) are rewritten; the other settings' rows stay as the README has them, and the
reproduce paragraph gains a sentence naming the command that redid them.

    python bench/results_table.py --root runs/bench            # everything (CPU: tens of minutes)
    python bench/results_table.py --root runs/bench --table-only
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

START, END = "<!-- results:start -->", "<!-- results:end -->"

# --grpo tunes the task generator once per reward (method=grpo's default algorithm, evolution strategies)
GRPO_REWARDS = {
    "val_accuracy": [],
    "pruned_val_accuracy": ["reward=pruned_val_accuracy", "reward.prune_fraction=0.9"],
    "quantized_val_accuracy": ["reward=quantized_val_accuracy", "reward.bits=4"],
}

# (label, folder under the root, overrides for every stage, extra overrides of the training stages:
# {"imitation": [...], "task": [...], "scratch": [...]}). Zoo sizes are what a 2-core CPU affords:
# digits needs ~1,000 runs for imitation to generalise (bench/generator_quality.py); the MNIST-1D
# zoos are smaller and shorter than the reference presets (README, SGD reference numbers). The task
# loss needs about as many steps as SGD takes on one network (bench/generator_capacity.py): the
# MNIST-1D settings get more; the from-scratch ablation gets fewer where CPU time ran short.
SETTINGS = [
    ("digits MLP", "digits-mlp", ["target=mlp", "task=digits", "zoo.runs=1024"],
     {"scratch": ["method.steps=1000"]}),
    ("MNIST-1D MLP", "mnist1d-mlp", ["experiment=mnist1d_mlp", "zoo.runs=128", "zoo.epochs=60"],
     # 5,000 task-loss steps: validation accuracy 0.558 at the end of a 2,000-step schedule, 0.576 of a 5,000-step one
     {"task": ["method.steps=5000", "method.eval_every=500", "method.save_every=500"],
      "scratch": ["method.steps=1000", "method.eval_every=200", "method.save_every=200"]}),
    ("MNIST-1D CNN", "mnist1d-cnn", ["experiment=mnist1d_cnn", "zoo.runs=24", "zoo.epochs=30"],
     {"imitation": ["method.steps=400", "method.eval_every=200", "method.save_every=200"],
      # the 20-run imitation generator emits networks with flat logits that the task loss cannot leave
      # (README): the CNN starts from a fresh generator anchored to the init (method.start=fresh), with
      # row-mean scaling (fan-ins 160 and 1,152; README: 0.675 validation accuracy at 1,000 steps, 0.382 without)
      "task": ["method.start=fresh", "generator.row_mean_scaling=true", "method.anchor_weight=0.01", "method.steps=3000", "method.inits_per_step=4",
               "method.eval_every=200", "method.save_every=200"],
      "scratch": ["method.steps=500", "method.inits_per_step=4", "method.eval_every=100", "method.save_every=100"]}),
    # the proof of concept's 421,642-parameter CNN on real MNIST (needs --mnist-dir): an 8-run, one-epoch zoo
    # (about 35 s wall, 68 s of CPU on 2 threads, a run) serves only the evaluation; no imitation stage (the
    # flat MLP would have 431M parameters; imitation of the MNIST-1D CNN stays at chance), the task loss from a
    # fresh generator (each twin checkpoint is scored on 15,000 images: 10 checkpoints, not 50, keep the twins
    # under 20 min; a validation pass of 8 inits takes ~38 s, hence every 200 steps). generator.row_mean_scaling:
    # without it the generator shifts whole wide layers below zero and stays at chance; generator.probes=16: without
    # them a fresh generator sat at chance for 600 steps (README: validation 0.11 after 800 steps of a 1,000-step
    # schedule, 0.918 with probes)
    ("MNIST PoC CNN", "mnist-poc_cnn", ["target=poc_cnn", "task=mnist", "zoo.runs=8", "zoo.epochs=1",
                                        "zoo.lr=0.001", "zoo.batch_size=64", "evaluate.twin_checkpoints=10"],
     {"generators": [],
      "task": ["method.start=fresh", "generator.row_mean_scaling=true", "generator.probes=16", "method.anchor_weight=0.01",
               "method.steps=3000", "method.inits_per_step=2", "method.batch_size=128", "method.val_inits=8",
               "method.eval_every=200", "method.save_every=200"]}),
]
NEEDS_MNIST = {"mnist-poc_cnn"}  # settings on real MNIST: run only with --mnist-dir


def run(argv: list[str]) -> None:
    from synthnet.cli import main
    from synthnet.config import COMMANDS

    import synthnet.commands  # noqa: F401  (registers the commands)

    if argv[0] not in COMMANDS:
        raise SystemExit(f"results_table: `synthnet {argv[0]}` does not exist in this checkout; "
                         f"available: {', '.join(COMMANDS)}")
    print("+ synthnet " + shlex.join(argv), flush=True)
    code = main(argv)
    if code != 0:
        raise SystemExit(f"results_table: `synthnet {shlex.join(argv)}` failed with exit code {code}")


def _newest(folder: Path) -> float:
    return max((f.stat().st_mtime for f in folder.rglob("*") if f.is_file()), default=0.0)


def timed(times: dict[str, dict[str, float]], stage: str, argv: list[str], output: Path | None = None) -> None:
    """``run(argv)`` and record its wall and CPU seconds (all threads of this process) under ``stage``.

    With ``output`` (the folder the stage writes to): a stage that wrote nothing there (the CLI found the work
    done) records nothing, so its last real time stands; one that continued resumable state in ``output/resume``
    (a state file there before it that it rewrote or removed; finished GRPO stages keep theirs untouched) is
    marked ``resumed`` (its seconds cover only the part after the resume)."""
    before = _newest(output) if output is not None and output.is_dir() else None
    states = {f: f.stat().st_mtime for f in (output / "resume").glob("*.safetensors")} if output is not None else {}
    wall, cpu = time.perf_counter(), time.process_time()
    run(argv)
    resumed = any(not f.is_file() or f.stat().st_mtime != mtime for f, mtime in states.items())
    if before is not None and _newest(output) == before:
        return
    times[stage] = {"wall_s": round(time.perf_counter() - wall, 1), "cpu_s": round(time.process_time() - cpu, 1),
                    **({"resumed": True} if resumed else {})}


def pipeline(root: Path, folder: str, overrides: list[str], stage_overrides: dict[str, list[str]],
             args: argparse.Namespace) -> None:
    """zoo -> imitation (each generator) -> task [-> task from scratch] [-> GRPO from the task generator]
    -> evaluate, with the wall and CPU seconds of each stage in ``<root>/<folder>/stage_times.json``
    (stages this call does not run keep the times of their last run)."""
    common = [f"paths.root={root}", f"seed={args.seed}", "progress=false", *args.override]
    if folder in NEEDS_MNIST:
        common.append(f"task.dir={args.mnist_dir}")
    times: dict[str, dict[str, float]] = {}
    imitation_overrides = stage_overrides.get("imitation", [])
    task_overrides = stage_overrides.get("task", []) + [f"method.imitation.{o.removeprefix('method.')}"
                                                         for o in imitation_overrides]
    generators_dir = root / folder / "generators"
    timed(times, "zoo", ["zoo", *overrides, *common, *([f"zoo.runs={args.runs}"] if args.runs else [])],
          root / folder / "checkpoints")
    if args.grpo_only:
        args = argparse.Namespace(**{**vars(args), "generators": [], "no_task": True, "scratch": False,
                                     "grpo": True})
        stage_overrides = {**stage_overrides, "task": [o for o in stage_overrides.get("task", [])
                                                       if o == "method.start=fresh"]}
    generators = stage_overrides.get("generators", args.generators)
    if not args.skip_train:
        for generator in generators:
            timed(times, f"{generator} imitation", ["train", *overrides, *common, f"generator={generator}",
                                                    "method=imitation", *imitation_overrides], generators_dir)
        first = generators[0] if generators else "perceiver_moe"
        if not args.no_task:
            timed(times, f"{first} task", ["train", *overrides, *common, f"generator={first}", "method=task",
                                           *task_overrides], generators_dir)
        if args.scratch:
            timed(times, f"{first} task from scratch", ["train", *overrides, *common, f"generator={first}",
                                                        "method=task", "method.from_scratch=true",
                                                        *stage_overrides.get("scratch", task_overrides)],
                  generators_dir)
        if args.grpo:
            fresh = "method.start=fresh" in stage_overrides.get("task", [])
            kind = 'imitation' if args.no_task and not args.grpo_only else 'task-fresh' if fresh else 'task'
            source = root / folder / "generators" / f"{first}-{kind}.safetensors"
            for reward, reward_overrides in GRPO_REWARDS.items():
                timed(times, f"{first} grpo{'' if reward == 'val_accuracy' else ' ' + reward}",
                      ["train", *overrides, *common, f"generator={first}", "method=grpo", f"method.source={source}",
                       *reward_overrides], generators_dir)
    timed(times, "evaluate", ["evaluate", *overrides, *common, f"evaluate.count={args.count}"])
    from synthnet.storage import atomic_write_bytes
    path = root / folder / "stage_times.json"
    earlier = json.loads(path.read_text()) if path.is_file() else {}  # stages not re-run keep their last times
    atomic_write_bytes(path, json.dumps({**earlier, **times}, indent=1).encode())


def _f(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def kept(block: str, labels: set[str]) -> tuple[dict[str, list[str]], dict[str, list[str]], str, set[str]]:
    """From the README block as it stands, what a run over other settings leaves alone: the result rows and the
    stage-time rows of the settings labelled ``labels`` (by label), its reproduce paragraph and its machines."""
    rows: dict[str, list[str]] = {}
    stage_rows: dict[str, list[str]] = {}
    reproduce, machines, in_stages = "", set(), False
    for line in block.splitlines():
        if line.startswith("| setting | stages |"):
            in_stages = True
        elif line.startswith("| ") and line.count("|") > 2:
            label = line.split("|")[1].strip()
            if label in labels:
                # a row with only the setting and one cell of stage times belongs to the stage table
                target = stage_rows if in_stages or line.count("|") == 3 else rows
                target.setdefault(label, []).append(line)
        elif line.startswith("Reproduce"):
            reproduce = line
        elif line.startswith("Machine: "):
            machines.update(line.removeprefix("Machine: ").split("; "))
    return rows, stage_rows, reproduce, machines


def table(root: Path, command: str, settings: list[str], previous: str = "") -> str:
    """Markdown for the README from ``<root>/<setting>/reports/report.json``. The rows of settings not in
    ``settings`` are kept from ``previous`` (the block as it stands), so ``--settings`` redoes only its own."""
    others = {label for label, folder, _, _ in SETTINGS if folder not in settings}
    old_rows, old_stage_rows, old_reproduce, machines = kept(previous, others)
    if not old_rows:  # nothing kept: the machines are this run's alone
        machines = set()
    ran = [label for label, folder, _, _ in SETTINGS if folder in settings]
    from synthnet.evaluation.report import HEADLINE_COLUMNS, headline_cells

    extra = ["90% pruned test accuracy", "int4 test accuracy"]
    header = ["| setting | networks | test accuracy | " + " | ".join(HEADLINE_COLUMNS + extra) + " |",
              "|---" * (len(HEADLINE_COLUMNS) + len(extra) + 3) + "|"]
    new_rows: dict[str, list[str]] = {}

    def compressed(row: dict) -> list[str]:  # the 90%-pruned and int4 cells ("" where the report lacks them)
        pruned = (row.get("pruned_test_accuracy") or {}).get("0.9")
        quantized = (row.get("quantized_test_accuracy") or {}).get("int4")
        return ["" if pruned is None else _f(pruned["mean"]), "" if quantized is None else _f(quantized["mean"])]

    for label, folder, _, _ in [s for s in SETTINGS if s[1] in settings]:
        lines = new_rows.setdefault(label, [])
        path = root / folder / "reports" / "report.json"
        if not path.is_file():
            raise SystemExit(f"results_table: no report at {path}; run without --table-only first")
        report = json.loads(path.read_text())
        machines.add(report["header"].get("machine", "unknown"))
        twins = report["twins"]
        for name, gen in report["generators"].items():
            accuracy = f"{_f(gen['test_accuracy']['mean'])} ± {_f(gen['test_accuracy']['std'])}"
            lines.append(f"| {label} | {name} | {accuracy} | " + " | ".join(headline_cells(gen) + compressed(gen))
                         + " |")
        lines.append(f"| {label} | SGD twins (same inits) | {_f(twins['test_accuracy']['mean'])} ± "
                     f"{_f(twins['test_accuracy']['std'])} | 1 | 1 (max IoU {_f(twins['max_iou_vs_zoo']['mean'])}) "
                     f"| 1 | 1 | 1 | 1 | 1 | 1 | | " + " | ".join(compressed(twins)) + " |")
        for name in ("aligned average", "noise x0.1"):
            if name in report["baselines"]:
                row = report["baselines"][name]
                lines.append(f"| {label} | baseline: {name} | {_f(row['test_accuracy']['mean'])} ± "
                             f"{_f(row['test_accuracy']['std'])} | {_f(row['test_accuracy']['mean'] / twins['test_accuracy']['mean'])} "
                             f"| {_f(row['max_iou_vs_zoo']['mean'] / twins['max_iou_vs_zoo']['mean'])} | "
                             f"{_f((row.get('at_sgd_accuracy') or {}).get('novelty_ratio'))} "
                             f"| {_f(row['nearest_zoo_distance_aligned']['mean'] / twins['nearest_zoo_distance_aligned']['mean'])} "
                             f"| | {_f(row['diversity_disagreement'] / twins['diversity_disagreement'])} | | | | | |")
    lines = header + [row for label, *_ in SETTINGS for row in new_rows.get(label, old_rows.get(label, []))]
    if old_rows and old_reproduce:
        reproduce = f"{old_reproduce} The {', '.join(ran)} rows were then redone with `{command}`."
    else:
        reproduce = f"Reproduce: `{command}`"
    lines += ["", "Ratios are generated / SGD twin (twins: the target trained with the zoo's recipe from the same "
              "inits, as the zoo trains it). Novelty ratio (max error-set IoU with any zoo final) below 1: fewer test "
              "errors shared with the zoo than an independent SGD run. Less accurate networks share fewer errors "
              "with anything, so 'at matched accuracy' compares with each twin at the checkpoint where its "
              "validation accuracy first reached the generated network's (baselines: the twins where their mean "
              "validation accuracy reaches the baseline's), and 'dominated by' uses that matched ratio. Weight "
              "novelty ratio (aligned distance to the nearest zoo checkpoint) above 1: farther from the zoo. "
              "Time-to-accuracy ratio = twin training seconds per network to the same validation accuracy / "
              "generation seconds per network, both from the inits in hand (above 1: generating is faster). "
              "Pruned: the smallest 90% of each network's weights zeroed (global magnitude, exact count; the twins "
              "pruned post hoc the same way); int4: round to nearest, one scale per output channel.", "",
              reproduce, "", f"Machine: {'; '.join(sorted(machines))}"]
    stage_rows = []
    for label, folder, _, _ in SETTINGS:
        path = root / folder / "stage_times.json"
        if folder in settings and path.is_file():
            stages = json.loads(path.read_text())
            stage_rows.append(f"| {label} | " + ", ".join(
                f"{name} {t['cpu_s']:.0f} ({t['wall_s']:.0f}{'; resumed, this part only' if t.get('resumed') else ''})"
                for name, t in stages.items()) + " |")
        elif folder not in settings:
            stage_rows += old_stage_rows.get(label, [])
    if stage_rows:
        lines += ["", "CPU seconds of each stage, all threads (wall seconds in brackets), from the same run:", "",
                  "| setting | stages |", "|---|---|", *stage_rows]
    return "\n".join(lines)


def write_readme(readme: Path, text: str) -> None:
    from synthnet.storage import atomic_write_bytes

    if not readme.is_file():
        raise SystemExit(f"results_table: {readme} does not exist")
    content = readme.read_text()
    if content.count(START) != 1 or content.count(END) != 1 or content.index(START) > content.index(END):
        raise SystemExit(f"results_table: {readme} needs exactly one '{START}' line followed by one '{END}' "
                         f"line where the table goes")
    head, rest = content.split(START)
    _, tail = rest.split(END)
    atomic_write_bytes(readme, (head + START + "\n" + text + "\n" + END + tail).encode())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="runs/bench", type=Path, help="paths.root for every stage")
    parser.add_argument("--readme", default=Path(__file__).resolve().parents[1] / "README.md", type=Path)
    parser.add_argument("--runs", type=int, default=None, help="zoo runs for every setting (default: per setting)")
    parser.add_argument("--count", type=int, default=16, help="generated networks and SGD twins per row")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--generators", nargs="+", default=["perceiver_moe", "flat_mlp"])
    parser.add_argument("--grpo", action="store_true", help="also tune the first generator (from its task file) "
                                                            "with method=grpo, once per reward: validation accuracy, "
                                                            "90%%-pruned and int4 validation accuracy")
    parser.add_argument("--grpo-only", action="store_true", help="only the --grpo stages and the evaluation (the "
                                                                 "other generator files must be there)")
    parser.add_argument("--no-task", action="store_true", help="skip the task-loss stage (imitation rows only)")
    parser.add_argument("--scratch", action="store_true", help="also train the task-loss-from-scratch ablation")
    parser.add_argument("--skip-train", action="store_true", help="evaluate the generator files already there")
    parser.add_argument("--table-only", action="store_true", help="only rebuild the table from existing reports")
    parser.add_argument("--settings", nargs="+", default=None,
                        help=f"folders to run (default: all; {', '.join(sorted(NEEDS_MNIST))} only with --mnist-dir)")
    parser.add_argument("--mnist-dir", type=Path, default=None,
                        help="folder of the four MNIST IDX files, for the settings on real MNIST")
    parser.add_argument("--override", nargs="*", default=[], help="extra key=value overrides for every stage")
    args = parser.parse_args(argv)
    if args.settings is None:
        args.settings = [s[1] for s in SETTINGS if s[1] not in NEEDS_MNIST or args.mnist_dir is not None]
    unknown = sorted(set(args.settings) - {s[1] for s in SETTINGS})
    if unknown:
        parser.error(f"unknown settings {unknown}; available: {', '.join(s[1] for s in SETTINGS)}")
    if not args.table_only and args.mnist_dir is None and NEEDS_MNIST & set(args.settings):
        parser.error(f"{', '.join(sorted(NEEDS_MNIST & set(args.settings)))} runs on real MNIST: pass --mnist-dir "
                     f"DIR (the four IDX files)")
    readme_text = args.readme.read_text() if args.readme.is_file() else ""
    if START not in readme_text or END not in readme_text:  # fail before hours of work, not after
        raise SystemExit(f"results_table: {args.readme} lacks the '{START}' / '{END}' markers")
    if not args.table_only:
        for label, folder, overrides, stage_overrides in SETTINGS:
            if folder in args.settings:
                print(f"\n=== {label} ===", flush=True)
                pipeline(args.root, folder, overrides, stage_overrides, args)
    given = list(argv if argv is not None else sys.argv[1:])
    if "--readme" in given:  # where the table was written is not part of what reproduces it
        at = given.index("--readme")
        del given[at:at + 2]
    given = [a for a in given if not a.startswith("--readme=")]
    command = "python bench/results_table.py " + shlex.join(given)
    block = readme_text.split(START)[1].split(END)[0]
    write_readme(args.readme, table(args.root, command.strip(), args.settings, block))
    print(f"results table written to {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
