"""Writing the evaluation: ``report.json`` (every number), ``report.md`` (the tables) and PNG
plots, all written atomically into the reports folder."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from synthnet.storage import atomic_write_bytes


def _finite(value: Any) -> Any:
    """JSON has no NaN/Inf: they become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def to_json(result: Mapping[str, Any]) -> str:
    return json.dumps(_finite(result), indent=1, sort_keys=False, allow_nan=False)


HEADLINE_COLUMNS = ["accuracy ratio", "novelty ratio (max IoU)", "at matched accuracy", "weight novelty ratio",
                    "at matched accuracy", "diversity ratio", "input sensitivity ratio", "time-to-accuracy ratio",
                    "dominated by baselines"]


def headline_cells(gen: Mapping[str, Any]) -> list[str]:
    """One generator's headline numbers as table cells, in the order of :data:`HEADLINE_COLUMNS`."""
    h = gen["headline"]
    flag = (" **(insensitive)**" if gen["input_sensitivity"]["input_insensitive"]
            else " **(collapsed)**" if gen["input_sensitivity"].get("collapsed") else "")
    return [_f(h["accuracy_ratio"]), _f(h["novelty_ratio"]), _f(h.get("novelty_ratio_matched_accuracy")),
            _f(h["weight_novelty_ratio"]), _f(h.get("weight_novelty_ratio_matched_accuracy")),
            _f(h["diversity_ratio"]), _f(h["input_sensitivity_ratio"]) + flag, _f(h["time_to_accuracy_ratio"], 1),
            ", ".join(gen["placement"]["dominated_by"]) or "none"]


def _f(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _pm(stats: Mapping[str, float] | None, digits: int = 3) -> str:
    if not stats:
        return "n/a"
    return f"{_f(stats['mean'], digits)} ± {_f(stats['std'], digits)}"


def rows(result: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """Rows of the main table in order: generators, SGD twins, zoo finals, baselines."""
    out = [(name, row) for name, row in result["generators"].items()]
    out.append(("SGD twins", result["twins"]))
    out.append(("zoo finals (vs other runs)", result["zoo"]))
    out += [(f"baseline: {name}", row) for name, row in result["baselines"].items()]
    return out


def markdown(result: Mapping[str, Any], header: Mapping[str, Any]) -> str:
    lines = [f"# SynthNet evaluation: {header.get('target', '?')} on {result['task']['name']}", ""]
    for key, value in header.items():
        lines.append(f"- {key}: `{value}`" if key == "command" else f"- {key}: {value}")
    lines += [f"- zoo: {len(result['zoo']['seeds'])} runs; weight-space novelty against {result['zoo']['pool_size']} "
              f"{result['zoo']['novelty_pool']}; test split {result['task']['test_examples']} examples "
              f"(reported only), validation {result['task']['val_examples']} (the only split used for choices)", ""]

    if result["generators"]:
        lines += ["## Headline (generated / SGD twin; same inits)", "",
                  "| generator | " + " | ".join(HEADLINE_COLUMNS) + " |", "|---" * (len(HEADLINE_COLUMNS) + 1) + "|"]
        for name, gen in result["generators"].items():
            lines.append(f"| {name} | " + " | ".join(headline_cells(gen)) + " |")
        lines += ["", "Novelty ratio (max IoU) below 1: the generated networks share fewer test errors with the "
                  "zoo than the final SGD twins do. Less accurate networks make more, and more varied, errors, so "
                  "their max IoU is lower whatever made them: 'at matched accuracy' compares with each twin at the "
                  "checkpoint where its validation accuracy first reached the generated network's. Weight novelty "
                  "ratio above 1: farther from every zoo checkpoint than the twins. 'Dominated by' compares novelty "
                  "at equal accuracy too (each row's max IoU over SGD's at that row's accuracy). Time-to-accuracy "
                  "ratio: twin training time per network to the same validation accuracy / generation time per "
                  "network (above 1: generating is faster).", ""]

    lines += ["## Accuracy, novelty and diversity (test split; final step)", "",
              "| networks | n | test accuracy | max IoU vs zoo | / SGD's at this accuracy | nearest zoo distance (aligned) "
              "| (unaligned) | disagreement | pairwise IoU | pairwise distance (aligned) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in rows(result):
        at_sgd = row.get("at_sgd_accuracy") or {}
        lines.append(f"| {name} | {row['count']} | {_pm(row['test_accuracy'])} | {_pm(row['max_iou_vs_zoo'])} | "
                     f"{_f(at_sgd.get('novelty_ratio'))}{'' if at_sgd.get('reached', True) else ' (above SGD)'} | "
                     f"{_pm(row['nearest_zoo_distance_aligned'])} | {_pm(row['nearest_zoo_distance_unaligned'])} | "
                     f"{_f(row['diversity_disagreement'])} | {_f(row['pairwise_iou'])} | "
                     f"{_f(row['pairwise_distance_aligned'])} |")
    lines += ["", "IoU: intersection over union of the sets of test examples two networks get wrong "
              "(1 = the same mistakes). '/ SGD's at this accuracy': the row's max IoU over the SGD twins' at the "
              "first checkpoint where their mean validation accuracy reaches the row's ('above SGD': never "
              "reached, compared with the final twins). Distances are relative L2 (||a - b|| / ||b||) after Hungarian matching "
              "of hidden units.", ""]

    for name, gen in result["generators"].items():
        lines += [f"## {name}: accuracy per generation step (test)", "",
                  "| step | mean | median | std | min | max | SGD twins at the same time: mean, median, std, min, max "
                  "(SGD step) |", "|---|---|---|---|---|---|---|"]
        for s in gen["per_step"]:
            a, t = s["test_accuracy"], s["twin_test_accuracy"]
            lines.append(f"| {s['step']} | {_f(a['mean'])} | {_f(a['median'])} | {_f(a['std'])} | {_f(a['min'])} | "
                         f"{_f(a['max'])} | {_f(t['mean'])}, {_f(t['median'])}, {_f(t['std'])}, {_f(t['min'])}, "
                         f"{_f(t['max'])} ({s['twin_step']}) |")
        lines += ["", f"## {name}: per-step fidelity to the SGD twin's endpoint", "",
                  "| step | cosine similarity to twin | magnitude ratio to twin | test accuracy "
                  "| update cosine (from the init) |", "|---|---|---|---|---|"]
        for s in gen["per_step"]:
            lines.append(f"| {s['step']} | {_pm(s['cosine_to_twin'])} | {_pm(s['magnitude_ratio_to_twin'])} | "
                         f"{_f(s['test_accuracy']['mean'])} | {_pm(s['update_cosine_to_twin'])} |")
        sens, timing, matched = gen["input_sensitivity"], gen["time_to_accuracy"], gen["twins_at_matched_accuracy"]
        place = gen["placement"]
        lines += ["", f"- input sensitivity: outputs of different inits are {_f(sens['spread'])} apart (aligned, "
                  f"relative), twins {_f(sens['reference_spread'])}; ratio {_f(sens['ratio'])}"
                  + (" -- **flagged: the generator ignores its input**" if sens["input_insensitive"] else
                     " -- **flagged: collapsed (outputs less spread and less diverse than SGD's from the same inits)**"
                     if sens.get("collapsed") else ""),
                  f"- SGD twins at matched accuracy (test {_pm(matched['test_accuracy'])}): max IoU vs zoo "
                  f"{_pm(matched['max_iou_vs_zoo'])}, aligned distance to the nearest zoo checkpoint "
                  f"{_pm(matched['nearest_zoo_distance_aligned'])}",
                  f"- time to accuracy (per network, from the inits in hand to the weights in hand): generating took "
                  f"{_f(timing.get('generation_seconds_per_network'), 4)} s ({timing['networks']} networks in "
                  f"{_f(timing['generation_seconds'], 4)} s); each twin needed {_pm(timing['twin_seconds_to_same_accuracy'], 4)} s "
                  f"of training, trained {timing.get('twin_group_size', 1)} at a time as the zoo trains this target, "
                  f"to first reach the network's validation accuracy ({timing['twins_reaching']}/{timing['networks']} "
                  f"reached it; median ratio {_f(timing['ratio'], 1)}). Scoring the twins' checkpoints is not timed.",
                  f"- max IoU vs zoo {_f(gen['max_iou_vs_zoo']['mean'])} against SGD's "
                  f"{_f(gen['at_sgd_accuracy']['sgd_max_iou_vs_zoo'])} at the same validation accuracy (SGD step "
                  f"{gen['at_sgd_accuracy']['twin_step']}): ratio {_f(gen['at_sgd_accuracy']['novelty_ratio'])}",
                  f"- among the baselines (novelty compared at equal accuracy, see below): more accurate than {', '.join(place['more_accurate_than']) or 'none'}; "
                  f"more novel than {', '.join(place['more_novel_than']) or 'none'}; dominates "
                  f"{', '.join(place['dominates']) or 'none'}; dominated by {', '.join(place['dominated_by']) or 'none'}",
                  "- pruned test accuracy (smallest weights zeroed): " + "; ".join(
                      f"{p}: {_pm(acc)} (twins {_pm(result['twins']['pruned_test_accuracy'].get(p))})"
                      for p, acc in gen["pruned_test_accuracy"].items()),
                  "- quantized test accuracy (round to nearest, one scale per output channel): " + "; ".join(
                      f"{b}: {_pm(acc)} (twins {_pm(result['twins'].get('quantized_test_accuracy', {}).get(b))})"
                      for b, acc in gen.get("quantized_test_accuracy", {}).items()), ""]
    if not result["generators"]:
        lines += ["No generator was evaluated (evaluate.generators=[]): twins, zoo and baselines only.", ""]
    if result.get("architectures"):
        from synthnet.evaluation.architectures import markdown_table

        lines += ["## Held-out architectures (evaluate.architectures; SGD twins of each architecture from the same "
                  "inits, test split)", ""] + markdown_table(result["architectures"]) + [
                  "", "Novelty ratio: largest error-set IoU with the zoo's finals, generated / twins (below 1: "
                  "more novel than SGD); input sensitivity: aligned weight spread, generated / twins.", ""]
    lines += ["## Baselines", ""] + [f"- {name}: {row['description']}" for name, row in result["baselines"].items()]
    return "\n".join(lines) + "\n"


def _save(fig, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())
    return path


def plots(result: Mapping[str, Any], reports_dir: str | Path) -> list[Path]:
    """accuracy_per_step.png, accuracy_vs_novelty.png, fidelity_per_step.png, iou_matrices.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reports_dir = Path(reports_dir)
    written = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, gen in result["generators"].items():
        steps = [s["step"] for s in gen["per_step"]]
        mean = [s["test_accuracy"]["mean"] for s in gen["per_step"]]
        std = [s["test_accuracy"]["std"] for s in gen["per_step"]]
        ax.errorbar(steps, mean, yerr=std, marker="o", capsize=3, label=name)
        ax.plot(steps, [s["twin_test_accuracy"]["mean"] for s in gen["per_step"]], "k--", alpha=0.5,
                label=f"SGD twins at the same time ({name})")
    ax.axhline(result["twins"]["test_accuracy"]["mean"], color="k", lw=1, label="SGD twins, final")
    ax.set(xlabel="generation step", ylabel="test accuracy", title="Accuracy per generation step")
    ax.legend(fontsize=7)
    written.append(_save(fig, reports_dir / "accuracy_per_step.png"))
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, label in ((axes[0], "max_iou_vs_zoo", "max error-set IoU vs zoo finals (lower = more novel)"),
                           (axes[1], "nearest_zoo_distance_aligned", "aligned distance to nearest zoo checkpoint")):
        for name, row in rows(result):
            kind = "generator" if name in result["generators"] else ("twin" if name == "SGD twins" else "other")
            marker = {"generator": "*", "twin": "s", "other": "o"}[kind]
            size = {"generator": 180, "twin": 90, "other": 50}[kind]
            x, y = row[key]["mean"], row["test_accuracy"]["mean"]
            if x is None or not math.isfinite(x):
                continue
            ax.scatter([x], [y], marker=marker, s=size)
            ax.annotate(name.replace("baseline: ", ""), (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
        curve = result["twins"].get("curve", {})
        if key in curve:  # SGD along its training: the raw novelty a network of each accuracy shows anyway
            ax.plot(curve[key], curve["test_accuracy"], "k-", lw=0.8, alpha=0.6, label="SGD twins during training")
            ax.legend(fontsize=7, loc="lower left")
        for name, gen in result["generators"].items():  # the reference at the generator's own accuracy
            matched = gen["twins_at_matched_accuracy"]
            x, y = matched[key]["mean"], matched["test_accuracy"]["mean"]
            ax.scatter([x], [y], marker="s", s=60, facecolors="none", edgecolors="k")
            ax.annotate(f"SGD twins at {name}'s accuracy", (x, y), fontsize=6, xytext=(4, -8),
                        textcoords="offset points")
        ax.set(xlabel=label, ylabel="test accuracy")
    fig.suptitle("Accuracy vs novelty: generators, SGD twins, zoo and trivial baselines")
    written.append(_save(fig, reports_dir / "accuracy_vs_novelty.png"))
    plt.close(fig)

    if result["generators"]:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for name, gen in result["generators"].items():
            steps = [s["step"] for s in gen["per_step"]]
            for ax, key in ((axes[0], "cosine_to_twin"), (axes[1], "magnitude_ratio_to_twin")):
                ax.errorbar(steps, [s[key]["mean"] for s in gen["per_step"]],
                            yerr=[s[key]["std"] for s in gen["per_step"]], marker="o", capsize=3, label=name)
        axes[0].set(xlabel="generation step", ylabel="cosine similarity to SGD twin endpoint")
        axes[1].set(xlabel="generation step", ylabel="magnitude ratio to SGD twin endpoint")
        axes[1].axhline(1.0, color="k", lw=0.8)
        axes[0].legend(fontsize=7)
        written.append(_save(fig, reports_dir / "fidelity_per_step.png"))
        plt.close(fig)

    matrices = result.get("iou_matrices", {})
    if matrices:
        fig, axes = plt.subplots(1, len(matrices), figsize=(3.2 * len(matrices), 3.2), squeeze=False)
        for ax, (name, matrix) in zip(axes[0], matrices.items()):
            image = ax.imshow([[v if v is not None and v != float("-inf") else float("nan") for v in r]
                               for r in matrix], vmin=0, vmax=1, cmap="viridis")
            ax.set_title(name.replace("_", " "), fontsize=8)
        fig.colorbar(image, ax=list(axes[0]), shrink=0.8, label="error-set IoU")
        written.append(_save(fig, reports_dir / "iou_matrices.png"))
        plt.close(fig)
    return written


def write_report(result: Mapping[str, Any], header: Mapping[str, Any], reports_dir: str | Path) -> dict[str, Path]:
    """Write report.json, report.md and the plots; returns their paths."""
    reports_dir = Path(reports_dir)
    paths = {"json": reports_dir / "report.json", "markdown": reports_dir / "report.md"}
    atomic_write_bytes(paths["json"], to_json({"header": dict(header), **result}).encode())
    atomic_write_bytes(paths["markdown"], markdown(result, header).encode())
    for path in plots(result, reports_dir):
        paths[path.stem] = path
    return paths


def plot_reward_curve(records: Sequence[Mapping[str, Any]], path: str | Path, title: str = "GRPO reward") -> None:
    """Reward mean (thin line, and its running mean over a tenth of the run) and min..max (band)
    of each iteration's candidates, written to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not records:
        return
    iterations = [r["iteration"] for r in records]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.fill_between(iterations, [r["reward_min"] for r in records], [r["reward_max"] for r in records],
                    alpha=0.25, label="min..max over candidates")
    means = [r["reward_mean"] for r in records]
    ax.plot(iterations, means, linewidth=0.8, alpha=0.6, label="mean over candidates")
    window = max(1, len(means) // 10)
    smoothed = [sum(means[max(0, i - window + 1):i + 1]) / len(means[max(0, i - window + 1):i + 1])
                for i in range(len(means))]
    ax.plot(iterations, smoothed, linewidth=2, label=f"running mean ({window} iterations)")
    ax.set_xlabel("GRPO iteration")
    ax.set_ylabel(records[-1].get("reward", "reward"))
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
