"""Held-out architectures: a generator's networks for widths and depths other than its zoo's, beside SGD twins.

``synthnet evaluate evaluate.architectures=[[48],[32,32]]`` (and ``bench/families.py``) call
:func:`check_architectures` before any work, then :func:`evaluate_architectures`. For every architecture (a
target config that differs from the evaluated one only in its widths and depths) and every generator file
that can serve it (:func:`synthnet.generators.check_generator_matches`, the one check generate, GRPO and
the task method use too), it makes networks from the evaluation inits, trains SGD twins of *that* architecture from the same
inits with the zoo's recipe, and scores both on the test split:

* accuracy of the generated networks and of the twins, and their ratio;
* diversity ratio: mean pairwise disagreement of test predictions, generated / twins;
* input-sensitivity ratio: aligned pairwise weight distance of the outputs, generated / twins (0 is one network
  for every init);
* novelty ratio: mean over networks of the largest error-set IoU with any final of the evaluated target's zoo,
  generated / twins. It compares test errors, not weights, so it needs no zoo of the held-out architecture
  (there is none); below 1 is more novel than SGD.

``seen`` says whether the generator was trained on that architecture (its own target, or a member of the family
in its header). Selection never happens here: the test split only feeds the table.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Sequence

import torch

from synthnet.errors import SynthNetError

log = logging.getLogger("synthnet")


def architecture_config(base: Mapping[str, Any], entry: Any) -> dict[str, Any]:
    """One ``evaluate.architectures`` entry -> a target config: a list of integers replaces the family key of
    the target (``hidden`` of an MLP, ``channels`` of a CNN); a mapping replaces the keys it names (for a CNN
    whose depth changes, e.g. ``{channels: [64, 64], kernel_size: [5, 3]}``). Every other key stays ``base``'s."""
    from synthnet.targets import FAMILY_KEY

    name = str(base.get("name"))
    if isinstance(entry, Mapping):
        unknown = sorted(set(entry) - set(base))
        if unknown or "name" in entry:
            bad = unknown[0] if unknown else "name"
            raise SynthNetError(f"evaluate.architectures entry {dict(entry)} names target.{bad}, which target="
                                f"{name} does not have or that cannot change; keys: {', '.join(sorted(base))}")
        return {**dict(base), **{k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in entry.items()}}
    if isinstance(entry, (list, tuple)) and entry and \
            all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in entry):
        if name not in FAMILY_KEY:
            raise SynthNetError(f"evaluate.architectures: target={name} has no width list; give each entry as a "
                                f"mapping of target keys")
        return {**dict(base), FAMILY_KEY[name]: [int(v) for v in entry]}
    raise SynthNetError(f"evaluate.architectures entry {entry!r} is neither a list of positive widths (e.g. [48, 48]) "
                        f"nor a mapping of target keys (e.g. {{channels: [32, 32], kernel_size: 3}})")


def architecture_name(model: torch.nn.Module) -> str:
    """``64-48-10`` for an MLP (inputs, then every layer's outputs); ``conv64-conv64-linear10`` for anything with
    another layer kind."""
    specs = model.layer_specs()
    shapes = [tuple(model.get_parameter(s.weight).shape) for s in specs]
    if all(s.kind == "linear" for s in specs):
        return "-".join(str(v) for v in [shapes[0][1], *[shape[0] for shape in shapes]])
    return "-".join(f"{s.kind.replace('1d', '').replace('2d', '')}{shape[0]}" for s, shape in zip(specs, shapes))


def check_architectures(entries: Sequence[Any], base: Mapping[str, Any], task_config: Mapping[str, Any], task,
                        generators: Sequence[tuple[Any, Any]]) -> tuple[list[dict[str, Any]], int]:
    """The target configs of ``entries`` and the parameter count of the largest, after checking that each builds
    and that every generator can serve it (:func:`synthnet.generators.check_generator_matches`); raises
    :class:`SynthNetError` naming the first that does not."""
    from synthnet.generators import check_generator_matches
    from synthnet.targets import build_target

    if entries and not generators:
        raise SynthNetError("evaluate.architectures needs at least one generator file (evaluate.generators is empty)")
    configs = [architecture_config(base, entry) for entry in entries]
    largest = 0
    for config in configs:
        with torch.device("meta"):  # builds (so its options are checked) without allocating its weights
            model = build_target(config, task.input_shape, task.num_classes)
        largest = max(largest, sum(p.numel() for p in model.parameters()))
        for path, loaded in generators:
            check_generator_matches(path, loaded, config, dict(task_config))
    return configs, largest


def evaluate_architectures(*, configs: Sequence[Mapping[str, Any]], task, generators: Sequence[tuple[Any, Any]], seeds: Sequence[int], steps: int, recipe,
                           zoo_finals: Mapping[str, torch.Tensor] | None, zoo_model: torch.nn.Module | None,
                           device: str | torch.device = "cpu", group_size: int | None = None,
                           progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Rows of the held-out architectures table, one per (architecture, generator); see the module docstring.

    ``configs``: target configs from :func:`check_architectures`; ``generators``: (path, loaded generator) pairs;
    ``zoo_finals`` / ``zoo_model``: the evaluated target's zoo finals and a module to run them (None: no novelty
    column)."""
    from synthnet.generators import family_of
    from synthnet.evaluation import metrics
    from synthnet.evaluation.scoring import predictions
    from synthnet.evaluation.twins import train_twins
    from synthnet.generation import check_layout, generate_networks, target_layout
    from synthnet.targets import build_target, in_family, init_state_dict

    tick = progress or (lambda message: None)
    x_test, y_test = task.x_test.to(device), task.y_test.cpu()
    zoo_errors = None
    if zoo_finals is not None and zoo_model is not None:
        zoo_errors = metrics.error_sets(predictions(zoo_model, {k: v.to(device) for k, v in zoo_finals.items()},
                                                    x_test).cpu(), y_test)

    def scores(model, stacked) -> dict[str, Any]:
        predicted = predictions(model, {k: v.to(device) for k, v in stacked.items()}, x_test).cpu()
        errors = metrics.error_sets(predicted, y_test)
        return {"accuracy": float((predicted == y_test[None]).double().mean()),
                "diversity": metrics.mean_off_diagonal(metrics.disagreement(predicted, predicted)),
                "max_iou": float(metrics.error_set_iou(errors, zoo_errors).max(1).values.mean())
                if zoo_errors is not None else None}

    def ratio(a, b) -> float | None:
        return None if a is None or b is None or b == 0 else a / b

    rows = []
    for config in configs:
        model = build_target(config, task.input_shape, task.num_classes).to(device)
        specs = model.layer_specs()
        name = architecture_name(model)
        tick(f"twins {name}")
        inits = [init_state_dict(config, task.input_shape, task.num_classes, s) for s in seeds]
        twins = train_twins(model, inits, list(seeds), task, recipe, keep_steps=[], group_size=group_size)
        twin = scores(model, twins.final)
        log.info("architecture %s: SGD twins test accuracy %.4f", name, twin["accuracy"])
        for path, loaded in generators:
            tick(f"{path.stem} on {name}")
            _, layout = target_layout(config, task.input_shape, task.num_classes, loaded.chunk_size,
                                      loaded.bias_chunk)
            check_layout(layout, loaded.metadata.get("num_values"), str(path))
            final = generate_networks(loaded.model, layout, config, task.input_shape, task.num_classes, seeds,
                                      steps, device=device).state_dicts[-1]
            final = {k: v.detach().cpu() for k, v in final.items()}
            generated = scores(model, final)
            widths, depths = family_of(loaded.metadata)
            sensitivity = metrics.input_sensitivity(final, {k: v.cpu() for k, v in twins.final.items()}, specs)
            rows.append({
                "architecture": name, "target_config": config, "generator": path.stem,
                "seen": in_family(config, loaded.target_config, widths, depths),
                "generated_accuracy": generated["accuracy"], "twin_accuracy": twin["accuracy"],
                "accuracy_ratio": ratio(generated["accuracy"], twin["accuracy"]),
                "diversity_ratio": ratio(generated["diversity"], twin["diversity"]),
                "input_sensitivity_ratio": sensitivity["ratio"],
                "novelty_ratio": ratio(generated["max_iou"], twin["max_iou"]),
                "networks": len(seeds), "steps": int(steps)})
            log.info("architecture %s, %s (%s): test accuracy %.4f, ratio to twins %.3f", name, path.stem,
                     "seen" if rows[-1]["seen"] else "unseen", generated["accuracy"], rows[-1]["accuracy_ratio"])
    return rows


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The README / report table of :func:`evaluate_architectures` rows."""
    def f(value) -> str:
        return "n/a" if value is None else f"{value:.3f}"
    lines = ["| architecture | generator | seen in training | generated test acc | SGD twins test acc | "
             "accuracy ratio | diversity ratio | input sensitivity ratio | novelty ratio (error IoU vs zoo) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['architecture']} | {r['generator']} | {'seen' if r['seen'] else 'unseen'} | "
                     f"{f(r['generated_accuracy'])} | {f(r['twin_accuracy'])} | {f(r['accuracy_ratio'])} | "
                     f"{f(r['diversity_ratio'])} | {f(r['input_sensitivity_ratio'])} | {f(r['novelty_ratio'])} |")
    return lines
