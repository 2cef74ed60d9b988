"""What limits the generator: one curriculum (imitation, then the task loss) per generator variant,
on the same zoo and the same budget, in one side-by-side table.

    python bench/generator_capacity.py --root runs/capacity --setting mnist1d-mlp \
        [--imitation-steps 600] [--task-steps 400] [--variants base wide ...]

For each variant this runs ``synthnet train method=task`` (which trains imitation first; the
``fresh`` variants start from a new generator and skip it) with the variant's overrides into its
own folder, sharing one zoo, then generates networks from
``--count`` held-out inits (the task method's validation seeds) and prints: the generated
networks' loss on the whole **training** split (can the generator emit precise weights at
all?), their validation accuracy, their diversity (mean pairwise disagreement of validation
predictions), the output spread (pairwise distance of outputs / of inits: 0 means one network
for every init), the generator's size and the CPU seconds of each stage. Selection-free: the
numbers are on the validation split; the test split is not read.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

SETTINGS = {  # the results table's settings (bench/results_table.py), smaller zoos for a quick look
    "digits-mlp": ["target=mlp", "task=digits", "zoo.runs=256"],
    "mnist1d-mlp": ["experiment=mnist1d_mlp", "zoo.runs=128", "zoo.epochs=60"],
    "mnist1d-cnn": ["experiment=mnist1d_cnn", "zoo.runs=24", "zoo.epochs=30"],
    "digits-cnn": ["target=cnn", "target.channels=[8,16]", "target.kernel_size=3", "target.padding=1",
                   "target.pool=2", "target.fc=[]", "task=digits", "zoo.runs=64"],
}

VARIANTS = {  # name -> overrides (generator.* and method.* keys of `synthnet train method=task`)
    "base": [],
    "wide": ["generator.d_model=128"],
    "latents": ["generator.num_latents=96"],
    "deep": ["generator.num_blocks=4"],
    "decoder-3": ["+generator.decoder_depth=3"],
    "decoder-messages": ["+generator.decoder_messages=true"],
    "no-messages": ["generator.neuron_messages=false"],
    "probes": ["generator.probes=32"],
    "direct": ["generator.predict=direct"],
    "chunk-32": ["generator.chunk_size=32"],
    "lr-3e-4-anchor-1": ["method.lr=3e-4", "method.anchor_weight=1.0"],
    "no-anchor": ["method.anchor_weight=0"],
    "every-step": ["method.step_weights=[0.25,0.25,0.5,1]"],
    # a new generator anchored to the init, no imitation (what the results table uses for the CNN)
    "fresh": ["method.start=fresh", "method.anchor_weight=0.01"],
    "fresh-probes": ["method.start=fresh", "method.anchor_weight=0.01", "generator.probes=32"],
}


def run(argv: list[str]) -> None:
    from synthnet.cli import main

    print("+ synthnet " + " ".join(argv), flush=True)
    if main(argv) != 0:
        raise SystemExit(f"generator_capacity: `synthnet {' '.join(argv)}` failed")


def measure(cfg_overrides: list[str], generator_file: Path, count: int) -> dict[str, float]:
    """Generated networks from ``count`` held-out inits: training loss, validation accuracy, diversity."""
    from synthnet.config import compose, container
    from synthnet.generation import init_tokens, target_layout
    from synthnet.generators import load_generator
    from synthnet.methods.task import network_loss, validation_metrics
    from synthnet.sampling import sample
    from synthnet.tasks import build_task

    cfg = compose(cfg_overrides)
    loaded = load_generator(generator_file)
    task = build_task(container(cfg.task), cfg.paths.data_dir)
    target, layout = target_layout(container(cfg.target), task.input_shape, task.num_classes, loaded.chunk_size,
                                  loaded.bias_chunk)
    first = int(cfg.method.val_first_seed)
    inits = init_tokens(container(cfg.target), task.input_shape, task.num_classes, range(first, first + count), layout)
    steps = int(cfg.generate.steps)
    out = validation_metrics(loaded.model, inits, layout, steps, target, task.x_val, task.y_val)
    with torch.no_grad():
        final = sample(loaded.model, inits, layout, steps).final
        out["train_loss"] = float(network_loss(target, final, layout, task.x_train, task.y_train)[0])
    out["parameters"] = sum(p.numel() for p in loaded.model.parameters())
    return out


def main_bench(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="runs/capacity", type=Path)
    parser.add_argument("--setting", default="mnist1d-mlp", choices=sorted(SETTINGS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=sorted(VARIANTS))
    parser.add_argument("--imitation-steps", type=int, default=600)
    parser.add_argument("--task-steps", type=int, default=400)
    parser.add_argument("--count", type=int, default=16, help="held-out inits per variant")
    parser.add_argument("--zoo", type=Path, default=None, help="an existing checkpoints/ folder of this setting")
    parser.add_argument("--output", type=Path, default=None,
                        help="also write the table and raw rows (JSON) here; rows of other variants already in it "
                             "(same budget) are kept")
    args = parser.parse_args(argv)
    from synthnet.config import compose

    base = [*SETTINGS[args.setting], "progress=false", "seed=0"]
    zoo_root = args.root / args.setting / "zoo"
    checkpoints = args.zoo
    if checkpoints is None:
        run(["zoo", *base, f"paths.root={zoo_root}"])
        checkpoints = Path(compose([*base, f"paths.root={zoo_root}"]).paths.checkpoints_dir)
    rows, done = [], {}
    for name in sorted(args.variants, key=lambda v: v != "base"):
        root = args.root / args.setting / name
        overrides = [*base, f"paths.root={root}", f"paths.checkpoints_dir={checkpoints}", *VARIANTS[name],
                     f"method.steps={args.task_steps}", f"method.imitation.steps={args.imitation_steps}",
                     "method.patience=0", "method.eval_every=100", "method.imitation.eval_every=300"]
        # imitation and task are timed separately. Variants that change only method.* keys start from the
        # base variant's imitation generator (same generator, same zoo): one imitation run serves them all.
        # An imitation generator already on disk (a re-run) is reused and its time shown as "not timed".
        shared = not any(o.lstrip("+").startswith("generator.") for o in VARIANTS[name]) and "base" in done
        fresh = "method.start=fresh" in VARIANTS[name]
        if fresh:  # no imitation stage
            imitation_cpu = 0.0
        elif shared:
            overrides.append(f"method.source={done['base']}")
            imitation_cpu = float("nan")
        else:
            imitation_overrides = [o.replace("method.imitation.", "method.") for o in overrides
                                   if not o.startswith("method.") or o.startswith("method.imitation.")]
            reused = (Path(compose([*imitation_overrides, "method=imitation"]).paths.generators_dir)
                      / "perceiver_moe-imitation.safetensors").exists()
            cpu = time.process_time()
            run(["train", *imitation_overrides, "method=imitation"])
            imitation_cpu = float("nan") if reused else time.process_time() - cpu  # not timed when reused
        cpu = time.process_time()
        run(["train", *overrides, "method=task"])
        task_cpu = time.process_time() - cpu
        if name == "base":
            done["base"] = Path(compose([*overrides, "method=task"]).paths.generators_dir) / \
                "perceiver_moe-imitation.safetensors"
        cfg = compose([*overrides, "method=task"])
        generator_file = Path(cfg.paths.generators_dir) / \
            f"{cfg.generator.name}-task{'-fresh' if fresh else ''}.safetensors"
        row = {"variant": name, "overrides": " ".join(VARIANTS[name]) or "(defaults)",
               **measure([*overrides, "method=task"], generator_file, args.count),
               "imitation_cpu_s": imitation_cpu, "task_cpu_s": task_cpu}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.output and args.output.exists():  # a run of a few variants adds its rows to an earlier run's
        earlier = json.loads(args.output.read_text())
        if earlier.get("budget") == [args.imitation_steps, args.task_steps]:
            fresh = {r["variant"] for r in rows}
            rows = [r for r in earlier["rows"] if r["variant"] not in fresh] + rows
    lines = [f"{args.setting}: imitation {args.imitation_steps} steps, then task loss {args.task_steps} steps; "
             f"{args.count} held-out inits, 4 generation steps", "",
             "| variant | overrides | generator params | generated train loss | val accuracy | val disagreement "
             "| output spread | imitation CPU s | task CPU s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        imitation = "(not timed)" if r["imitation_cpu_s"] != r["imitation_cpu_s"] else f"{r['imitation_cpu_s']:.0f}"
        lines.append(f"| {r['variant']} | {r['overrides']} | {r['parameters']:,} | {r['train_loss']:.3f} | "
                     f"{r['val_accuracy']:.3f} | {r['val_disagreement']:.3f} | {r['output_spread']:.3f} | "
                     f"{imitation} | {r['task_cpu_s']:.0f} |")
    text = "\n".join(lines)
    print("\n" + text)
    if args.output:
        from synthnet.storage import atomic_write_bytes
        atomic_write_bytes(args.output, json.dumps({"table": text, "rows": rows,
                                                    "budget": [args.imitation_steps, args.task_steps]},
                                                   indent=1).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main_bench())
