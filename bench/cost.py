"""Cost against target size: tokens, generation time and memory, and generator training time per step, for
MLP and CNN targets of about 10K, 30K, 100K, 300K and 1M parameters, with fitted log-log slopes.

    python bench/cost.py [--steps 4] [--repeats 3] [--out bench/results/cost]

Targets take MNIST's 1x28x28 input and 10 classes (no data is read: cost does not depend on it). The
generator is the default `perceiver_moe` (untrained: its cost does not depend on its weights). Each size
runs in a fresh subprocess so that its peak resident memory (ru_maxrss) is its own: the table gives the
growth of the peak over the process after the generator and the target were built. Generation: `steps`
sampler steps from fresh inits, without gradients, batch 1 and batch 16 (seconds per network), the median
of `repeats`. Training: one imitation step (forward, per-layer MSE, backward, AdamW) on a batch of 8 pairs.
Both are also timed with the batch in one piece (no slicing: how the library ran before the slices), the
baseline beside them in the same process. A slope of 1 in log(cost) vs log(parameters) is linear growth.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

SIZES = [10_000, 30_000, 100_000, 300_000, 1_000_000]


def target_for(kind: str, size: int) -> dict:
    """A target config of about ``size`` parameters on 1x28x28 inputs."""
    if kind == "mlp":  # 784 h + h + 10 h + 10
        return {"name": "mlp", "hidden": [max(1, round((size - 10) / 795))], "activation": "relu"}
    # conv c (3x3), conv 2c (3x3), two 2x2 pools, dense 49 * 2c -> 10: 18 c^2 + 990 c + ... ~ size
    c = max(1, round((-990 + math.sqrt(990 ** 2 + 4 * 18 * size)) / (2 * 18)))
    return {"name": "cnn", "channels": [c, 2 * c], "kernel_size": 3, "stride": 1, "padding": None, "pool": 2,
            "fc": [], "activation": "relu"}


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(kind: str, size: int, steps: int, repeats: int) -> dict:
    import torch

    from synthnet.config import compose, container
    from synthnet.generation import init_tokens, target_layout
    from synthnet.generators import build_generator
    from synthnet import sampling
    from synthnet.methods.imitation import Batch, ImitationSettings, backward_in_slices, layer_value_weights
    from synthnet.sampling import sample

    torch.manual_seed(0)
    target = target_for(kind, size)
    config = container(compose([]).generator)
    model, layout = target_layout(target, (1, 28, 28), 10, int(config["chunk_size"]))
    generator = build_generator(config, layout)
    inits = init_tokens(target, (1, 28, 28), 10, range(16), layout)
    base = peak_mib()

    def timed(fn) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    generator.eval()
    with torch.no_grad():
        one = timed(lambda: sample(generator, inits[:1], layout, steps))
        sixteen = timed(lambda: sample(generator, inits, layout, steps)) / 16
        generation_peak = peak_mib() - base
        sliced_tokens, sampling.NO_GRAD_TOKENS = sampling.NO_GRAD_TOKENS, 1 << 40  # before: the batch in one piece
        sixteen_whole = timed(lambda: sample(generator, inits, layout, steps)) / 16
        sampling.NO_GRAD_TOKENS = sliced_tokens
    generator.train()
    optimizer = torch.optim.AdamW(generator.parameters(), lr=1e-4)
    weights = layer_value_weights(layout)

    batch = Batch(inits[:8], inits[8:16], torch.zeros(8), torch.ones(8))

    def train_step(slice_tokens: int) -> None:
        optimizer.zero_grad(set_to_none=True)
        backward_in_slices(generator, batch, layout, weights, slice_tokens, 0)
        optimizer.step()

    default_slice = ImitationSettings().slice_tokens
    train_step(default_slice)  # the optimizer's state is allocated on the first step
    train = timed(lambda: train_step(default_slice))
    train_peak = peak_mib() - base
    train_whole = timed(lambda: train_step(1 << 40))  # before: the batch in one piece
    return {"kind": kind, "params": sum(p.numel() for p in model.parameters()), "tokens": layout.num_tokens,
            "gen_1": one, "gen_16": sixteen, "gen_16_whole": sixteen_whole,
            "gen_peak_mib": generation_peak, "train_step": train, "train_step_whole": train_whole,
            "train_peak_mib": train_peak}


def sliced_tokens_default() -> int:
    from synthnet import sampling

    return sampling.NO_GRAD_TOKENS


def slope(xs: list[float], ys: list[float]) -> float:
    lx, ly = [math.log(x) for x in xs], [math.log(max(y, 1e-9)) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench/results/cost")
    parser.add_argument("--one", nargs=2, metavar=("KIND", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args.steps, args.repeats)))
        return
    rows = []
    for kind in ("mlp", "cnn"):
        for size in SIZES:
            done = subprocess.run([sys.executable, __file__, "--one", kind, str(size), "--steps", str(args.steps),
                                   "--repeats", str(args.repeats)], capture_output=True, text=True,
                                  env={**os.environ})
            if done.returncode:
                sys.exit(f"{kind} {size}: {done.stderr[-2000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"{kind} {rows[-1]['params']}: done", file=sys.stderr)
    lines = [f"# cost vs target size ({os.cpu_count()} CPU cores, default perceiver_moe, {args.steps} steps)", "",
             "Gen: seconds per network; batch 16 as the library runs it (slices of at most "
             f"{sliced_tokens_default()} tokens without gradients) and, for comparison, in one piece (before). "
             "Train: one imitation step on 8 pairs, in slices of method.slice_tokens (default) and in one piece "
             "(before). Peak: MiB over the process after the models were built (generation peak before the "
             "one-piece run).", "",
             "| target | parameters | tokens | gen batch 1 | gen batch 16 | gen batch 16, one piece | gen peak MiB "
             "| train s/step | train s/step, one piece | train peak MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['params']:,} | {r['tokens']:,} | {r['gen_1']:.4f} | {r['gen_16']:.4f} | "
                     f"{r['gen_16_whole']:.4f} | {r['gen_peak_mib']:.0f} | {r['train_step']:.3f} | "
                     f"{r['train_step_whole']:.3f} | {r['train_peak_mib']:.0f} |")
    lines += ["", "fitted slope of log(cost) on log(parameters) (1 = linear), over all sizes and over the three largest:",
              "", "| target | gen batch 1 | gen batch 16 | gen batch 16, one piece | gen peak memory | train step | "
              "train step, one piece | train peak memory |", "|---|---|---|---|---|---|---|---|"]
    for kind in ("mlp", "cnn"):
        for label, part in (("all", slice(None)), ("100K-1M", slice(-3, None))):
            rs = [r for r in rows if r["kind"] == kind][part]
            xs = [r["params"] for r in rs]
            cells = [f"{slope(xs, [r[k] for r in rs]):.2f}" for k in ("gen_1", "gen_16", "gen_16_whole",
                                                                        "gen_peak_mib", "train_step",
                                                                        "train_step_whole", "train_peak_mib")]
            lines.append(f"| {kind} ({label}) | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cost.md").write_text(text)


if __name__ == "__main__":
    main()
