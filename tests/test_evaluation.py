"""The evaluation report's metrics on constructed cases with known answers."""

from __future__ import annotations

import json
import math

import pytest
import torch

from synthnet.evaluation import metrics
from synthnet.evaluation.baselines import build_baselines
from synthnet.evaluation.pipeline import Generated, Options, ZooFinals, evaluate
from synthnet.evaluation.scoring import predictions, stack_state_dicts
from synthnet.evaluation.twins import Twins, train_twins
from synthnet.sampling import sample
from synthnet.storage import load_state_dict, read_metadata
from synthnet.targets import build_target, init_state_dict, permute_hidden, random_permutations
from synthnet.tokenization import build_layout, detokenize, tokenize
from synthnet.zoo import list_runs
from synthnet.zoo.training import Recipe


def zoo_finals(tiny_zoo, model) -> ZooFinals:
    runs = list_runs(tiny_zoo["checkpoints_dir"])
    seeds = sorted(runs)
    states = [load_state_dict(runs[s][-1], model)[0] for s in seeds]
    val = [read_metadata(runs[s][-1])["val_accuracy"] for s in seeds]
    finals = stack_state_dicts(states)
    return ZooFinals(seeds, finals, val, finals)


@pytest.fixture(scope="module")
def mlp(digits_task, tiny_zoo):
    return build_target(tiny_zoo["target"], digits_task.input_shape, digits_task.num_classes)


# --------------------------------------------------------------------------- behaviour


def test_identical_models_iou_one_disagreement_zero(digits_task, tiny_zoo, mlp):
    zoo = zoo_finals(tiny_zoo, mlp)
    same = {k: torch.cat([v[:1], v[:1]]) for k, v in zoo.finals.items()}  # one final, twice
    preds = predictions(mlp, same, digits_task.x_test)
    errors = metrics.error_sets(preds, digits_task.y_test)
    assert errors[0].sum() > 0  # a real, non-empty error set
    assert torch.equal(metrics.error_set_iou(errors, errors), torch.ones(2, 2, dtype=torch.float64))
    assert torch.equal(metrics.disagreement(preds, preds), torch.zeros(2, 2, dtype=torch.float64))


def test_disjoint_and_partial_error_sets():
    a = torch.tensor([[True, True, False, False, False, False]])
    b = torch.tensor([[False, False, True, True, False, False],   # disjoint: 0
                      [False, True, True, False, False, False],   # 1 shared of 3: 1/3
                      [False, False, False, False, False, False]])  # empty vs non-empty: 0
    assert torch.allclose(metrics.error_set_iou(a, b), torch.tensor([[0.0, 1 / 3, 0.0]], dtype=torch.float64))
    none = torch.zeros(2, 6, dtype=torch.bool)
    assert torch.equal(metrics.error_set_iou(none, none), torch.ones(2, 2, dtype=torch.float64))  # both perfect
    preds = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 0]])
    assert metrics.disagreement(preds, preds)[0, 1] == 0.25
    assert metrics.mean_off_diagonal(metrics.disagreement(preds, preds)) == 0.25


# --------------------------------------------------------------------------- weights


@pytest.mark.parametrize("target, input_shape", [
    ({"name": "mlp", "hidden": [12, 9]}, (1, 8, 8)),
    ({"name": "cnn", "channels": [5, 7], "kernel_size": 3, "pool": 2, "fc": [6]}, (1, 16)),  # conv1d + flatten
    ({"name": "cnn", "channels": [4], "kernel_size": 3, "pool": 2, "fc": []}, (2, 6, 6)),  # conv2d
])
def test_permuted_copy_aligns_to_distance_zero(target, input_shape):
    model = build_target(target, input_shape, 5)
    specs = model.layer_specs()
    state = init_state_dict(target, input_shape, 5, seed=3)
    perms = random_permutations(specs, state, torch.Generator().manual_seed(1))
    permuted = permute_hidden(state, specs, perms)
    x = torch.randn(7, *input_shape)
    with torch.no_grad():  # the permuted copy is the same function
        assert torch.allclose(torch.func.functional_call(model, state, (x,)),
                              torch.func.functional_call(model, permuted, (x,)), atol=1e-5)
    a, b = stack_state_dicts([permuted]), stack_state_dicts([state])
    assert metrics.relative_distance(a, b).item() > 0.5
    assert metrics.distance_matrix(a, b, specs, aligned=False).item() > 0.5
    assert metrics.distance_matrix(a, b, specs).item() == pytest.approx(0.0, abs=1e-7)
    aligned = metrics.align_pairs(a, b, specs)
    assert all(torch.equal(aligned[k], b[k]) for k in b)


def test_cosine_magnitude_and_input_sensitivity_of_a_constant():
    target, shape = {"name": "mlp", "hidden": [10]}, (1, 6)
    specs = build_target(target, shape, 3).layer_specs()
    inits = stack_state_dicts([init_state_dict(target, shape, 3, s) for s in range(4)])
    doubled = {k: 2 * v for k, v in inits.items()}
    assert torch.allclose(metrics.cosine_similarity(doubled, inits), torch.ones(4, dtype=torch.float64))
    assert torch.allclose(metrics.magnitude_ratio(doubled, inits), torch.full((4,), 2.0, dtype=torch.float64))
    constant = {k: v[:1].expand_as(v) for k, v in inits.items()}
    assert metrics.input_sensitivity(constant, inits, specs)["ratio"] == pytest.approx(0.0, abs=1e-9)
    assert metrics.input_sensitivity(inits, inits, specs)["ratio"] == pytest.approx(1.0)


# --------------------------------------------------------------------------- baselines


def test_baselines_are_built_from_the_zoo_they_claim(digits_task, tiny_zoo, mlp):
    zoo = zoo_finals(tiny_zoo, mlp)
    specs = mlp.layer_specs()
    baselines = {b.name: b for b in build_baselines(zoo.finals, zoo.seeds, zoo.val_accuracy, specs,
                                                    count_per_baseline=4, average_size=2, noise_scales=(0.1, 0.5))}
    assert set(baselines) == {"copy", "average", "aligned average", "noise x0.1", "noise x0.5", "gaussian fit"}
    index = {seed: i for i, seed in enumerate(zoo.seeds)}
    best = max(range(len(zoo.seeds)), key=lambda i: zoo.val_accuracy[i])
    assert baselines["copy"].sources[0] == [zoo.seeds[best]]  # chosen on validation accuracy
    for name, baseline in baselines.items():
        assert metrics.count(baseline.networks) == 4
        assert all(set(s) <= set(zoo.seeds) for s in baseline.sources)
        for i, sources in enumerate(baseline.sources):
            members = metrics.select(zoo.finals, [index[s] for s in sources])
            if name == "copy":
                assert all(torch.equal(baseline.networks[k][i], members[k][0]) for k in members)
            elif name == "average":
                assert len(sources) == 2
                assert all(torch.allclose(baseline.networks[k][i], members[k].mean(0)) for k in members)
            elif name == "aligned average":  # the mean of the members after matching them to the first
                anchor = {k: v[:1].expand_as(v) for k, v in members.items()}
                matched = metrics.align_pairs(members, anchor, specs)
                assert all(torch.allclose(baseline.networks[k][i], matched[k].mean(0)) for k in members)
            elif name.startswith("noise"):
                scale = float(name.split("x")[1])
                dist = metrics.relative_distance(metrics.select(baseline.networks, [i]), members).item()
                assert dist == pytest.approx(scale, rel=0.3)
    assert baselines["gaussian fit"].sources[0] == zoo.seeds


# --------------------------------------------------------------------------- twins and the whole report


def test_twin_of_a_zoo_seed_reproduces_the_zoo_run(digits_task, tiny_zoo, mlp):
    seed = 1
    init = init_state_dict(tiny_zoo["target"], digits_task.input_shape, digits_task.num_classes, seed)
    twins = train_twins(mlp, [init], [seed], digits_task, Recipe(**{**tiny_zoo["recipe"].__dict__,
                                                                  "checkpoint_every": 7}))
    zoo_final, _ = load_state_dict(list_runs(tiny_zoo["checkpoints_dir"])[seed][-1], mlp)
    assert all(torch.equal(twins.states[0][k][0], init[k]) for k in init)
    assert all(torch.allclose(twins.final[k][0], zoo_final[k], atol=1e-5) for k in zoo_final)
    assert twins.seconds[0, 0] == 0 and (twins.seconds.diff(dim=0) > 0).all()
    assert len(twins.steps) > tiny_zoo["recipe"].epochs  # the fine time grid


def test_twins_train_as_the_zoo_trains_the_target(digits_task, tiny_zoo, mlp):
    """A loop of single runs and one vmapped group give the same twins; a CNN defaults to the loop;
    a group's time is shared by its members; checkpoint scoring is not on the clock."""
    from synthnet.zoo import default_group_size

    seeds = [31, 32, 33]
    inits = [init_state_dict(tiny_zoo["target"], digits_task.input_shape, digits_task.num_classes, s) for s in seeds]
    recipe = Recipe(**{**tiny_zoo["recipe"].__dict__, "checkpoint_every": 10})
    grouped = train_twins(mlp, inits, seeds, digits_task, recipe, group_size=3)
    looped = train_twins(mlp, inits, seeds, digits_task, recipe, group_size=1)
    assert grouped.group_size == 3 and looped.group_size == 1
    assert torch.equal(grouped.steps, looped.steps)
    assert all(torch.allclose(grouped.final[k], looped.final[k], atol=1e-5) for k in grouped.final)
    assert torch.allclose(grouped.val_accuracy, looped.val_accuracy, atol=1e-3)
    cnn = build_target({"name": "cnn", "channels": [4], "kernel_size": 3, "pool": 2}, (1, 8, 8), 10)
    assert default_group_size(cnn) == 1 and default_group_size(mlp) > 1

    slow = {}  # the same training with a callback that sleeps: the clock must not see it

    def train_with_slow_scoring(*args, **kwargs):
        import time

        from synthnet.zoo import training

        def on_checkpoint(checkpoint, inner=args[5]):
            time.sleep(0.2)
            inner(checkpoint)
        return training.train_runs(*args[:5], on_checkpoint, **kwargs)

    import synthnet.evaluation.twins as twins_module
    original = twins_module.train_runs
    twins_module.train_runs = train_with_slow_scoring
    try:
        slow["twins"] = train_twins(mlp, inits[:1], seeds[:1], digits_task, recipe, group_size=1)
    finally:
        twins_module.train_runs = original
    slept = 0.2 * len(slow["twins"].steps)  # a callback of 0.2 s per checkpoint: not training time
    assert float(slow["twins"].seconds[-1, 0]) - float(looped.seconds[-1, 0]) < slept / 2


def test_time_to_reach_and_matching_read_validation_accuracy():
    twins = Twins(seeds=[0, 1], final_step=20, steps=torch.tensor([0, 10, 20]),
                  seconds=torch.tensor([[0.0, 0.0], [1.0, 1.5], [2.0, 3.0]], dtype=torch.float64),
                  val_accuracy=torch.tensor([[0.1, 0.1], [0.5, 0.9], [0.8, 0.95]], dtype=torch.float64),
                  test_accuracy=torch.tensor([[0.9, 0.9], [0.1, 0.1], [0.1, 0.1]], dtype=torch.float64), states={})
    seconds, reached = twins.time_to_reach(torch.tensor([0.6, 0.9]))
    assert seconds.tolist() == [2.0, 1.5] and reached.tolist() == [True, True]
    seconds, reached = twins.time_to_reach(torch.tensor([0.99, 0.05]))
    assert seconds.tolist() == [2.0, 0.0] and reached.tolist() == [False, True]
    index, reached = twins.first_reaching(torch.tensor([0.8, 0.95], dtype=torch.float64))
    assert index.tolist() == [2, 2] and reached.all()  # the test accuracy (0.9 at step 0) is never read
    assert twins.curve_reaching(0.7) == (1, True) and twins.curve_reaching(0.99) == (2, False)


def test_novelty_is_compared_at_equal_accuracy():
    """A baseline with lower accuracy and lower raw max IoU than a generator does not dominate it when
    SGD itself shows even lower IoU at the baseline's accuracy."""
    from synthnet.evaluation.pipeline import at_sgd_accuracy, placement

    twins = Twins(seeds=[0], final_step=20, steps=torch.tensor([0, 10, 20]),
                  seconds=torch.zeros(3, 1, dtype=torch.float64),
                  val_accuracy=torch.tensor([[0.1], [0.8], [0.9]], dtype=torch.float64),
                  test_accuracy=torch.tensor([[0.1], [0.8], [0.9]], dtype=torch.float64), states={})
    frontier = {"steps": [0, 10, 20], "max_iou_vs_zoo": [0.05, 0.2, 0.4]}

    def row(val, test, iou):
        out = {"val_accuracy": {"mean": val}, "test_accuracy": {"mean": test}, "max_iou_vs_zoo": {"mean": iou}}
        return {**out, "at_sgd_accuracy": at_sgd_accuracy(out, twins, frontier)}

    generator = row(0.9, 0.9, 0.36)  # SGD at 0.9: 0.4 -> ratio 0.9
    noisy_copy = row(0.8, 0.8, 0.30)  # SGD at 0.8: 0.2 -> ratio 1.5: lower raw IoU, but less novel than SGD
    assert generator["at_sgd_accuracy"]["novelty_ratio"] == pytest.approx(0.9)
    assert noisy_copy["at_sgd_accuracy"]["twin_step"] == 10
    assert noisy_copy["max_iou_vs_zoo"]["mean"] < generator["max_iou_vs_zoo"]["mean"]
    place = placement(generator, {"noise": noisy_copy})
    assert place["dominates"] == ["noise"] and place["dominated_by"] == []
    better = row(0.95, 0.95, 0.3)  # above every SGD checkpoint: compared with the final twins
    assert better["at_sgd_accuracy"]["reached"] is False
    assert placement(generator, {"better": better})["dominated_by"] == ["better"]


def run_generator(denoiser, layout, inits, steps=2) -> list[dict]:
    """What ``generate_networks`` does, for a stand-in denoiser: states per step."""
    result = sample(denoiser, tokenize(inits, layout), layout, steps)
    return [detokenize(x, layout) for x in result.trajectory]


def test_report_flags_a_constant_generator(digits_task, tiny_zoo, mlp, tmp_path):
    from synthnet.evaluation.report import to_json, write_report

    zoo = zoo_finals(tiny_zoo, mlp)
    specs = mlp.layer_specs()
    seeds = [2000000 + i for i in range(4)]
    inits = [init_state_dict(tiny_zoo["target"], digits_task.input_shape, digits_task.num_classes, s) for s in seeds]
    twins = train_twins(mlp, inits, seeds, digits_task, Recipe(**{**tiny_zoo["recipe"].__dict__,
                                                                "checkpoint_every": 10}))
    layout = build_layout(specs, mlp.state_dict(), chunk_size=16)
    memorised = tokenize(metrics.select(zoo.finals, [0]), layout)  # (1, tokens, chunk): a zoo final

    def constant(tokens, t_source, t_target, layout):  # ignores its input
        return memorised.expand_as(tokens)

    def identity(tokens, t_source, t_target, layout):
        return tokens

    def mostly_constant(tokens, t_source, t_target, layout):  # one network, nudged a little by its input
        return memorised + 0.6 * tokens

    stacked_inits = stack_state_dicts(inits)
    generated = [Generated("constant", run_generator(constant, layout, stacked_inits), 0.01),
                 Generated("identity", run_generator(identity, layout, stacked_inits), 0.01),
                 Generated("mostly_constant", run_generator(mostly_constant, layout, stacked_inits), 0.01)]
    baselines = build_baselines(zoo.finals, zoo.seeds, zoo.val_accuracy, specs, count_per_baseline=4)
    result = evaluate(model=mlp, specs=specs, task=digits_task, zoo=zoo, twins=twins, generated=generated,
                      baselines=baselines, options=Options(prune_fractions=(0.5,)))
    const, ident = result["generators"]["constant"], result["generators"]["identity"]
    assert const["input_sensitivity"]["input_insensitive"] and not ident["input_sensitivity"]["input_insensitive"]
    assert const["input_sensitivity"]["collapsed"] and not ident["input_sensitivity"]["collapsed"]
    nudged = result["generators"]["mostly_constant"]
    assert nudged["input_sensitivity"]["collapsed"] and not nudged["input_sensitivity"]["input_insensitive"]
    assert const["max_iou_vs_zoo"]["min"] == 1.0  # a copy of a zoo final: its errors exactly
    assert const["nearest_zoo_distance_aligned"]["max"] == pytest.approx(0.0, abs=1e-6)
    assert const["diversity_disagreement"] == 0.0 and const["headline"]["diversity_ratio"] == 0.0
    assert "copy" not in const["placement"]["more_novel_than"]
    assert ident["per_step"][-1]["test_accuracy"] == ident["per_step"][0]["test_accuracy"]
    assert ident["per_step"][0]["test_accuracy"]["mean"] == pytest.approx(float(twins.test_accuracy[0].mean()))
    assert ident["time_to_accuracy"]["twin_seconds_to_same_accuracy"]["max"] == 0.0  # an init is reached at once
    assert ident["twins_at_matched_accuracy"]["twin_steps"] == [0] * 4  # the twin at its init matches the init
    curve = result["twins"]["curve"]
    assert len(curve["max_iou_vs_zoo"]) == len(twins.steps) and curve["max_iou_vs_zoo"][-1] == pytest.approx(
        result["twins"]["max_iou_vs_zoo"]["mean"])
    assert result["twins"]["max_iou_vs_zoo"]["max"] < 1.0
    json.loads(to_json(result))  # strict JSON: no NaN
    paths = write_report(result, {"target": "mlp"}, tmp_path)
    assert {"json", "markdown", "accuracy_per_step", "accuracy_vs_novelty", "fidelity_per_step",
            "iou_matrices"} <= set(paths)
    text = paths["markdown"].read_text()
    assert "flagged: the generator ignores its input" in text and "| constant |" in text
    assert math.isclose(json.loads(paths["json"].read_text())["generators"]["constant"]["headline"]
                        ["input_sensitivity_ratio"], 0.0, abs_tol=1e-9)


def test_no_evaluation_choice_reads_the_test_split(digits_task, tiny_zoo, mlp):
    """Poison the test split (random labels, NaN inputs): every choice of the evaluation (matched
    twin checkpoints, where SGD stands at each row's accuracy, the twins themselves, the copied
    zoo finals) stays the same."""
    import dataclasses

    zoo = zoo_finals(tiny_zoo, mlp)
    specs = mlp.layer_specs()
    seeds = [2100000 + i for i in range(4)]
    inits = [init_state_dict(tiny_zoo["target"], digits_task.input_shape, digits_task.num_classes, s) for s in seeds]
    layout = build_layout(specs, mlp.state_dict(), chunk_size=16)
    target = tokenize(metrics.select(zoo.finals, [0]), layout)

    def halfway(tokens, t_source, t_target, layout):  # a generator that lands between init and a zoo final
        return 0.5 * tokens + 0.5 * target

    generator = torch.Generator().manual_seed(0)
    poisoned = dataclasses.replace(
        digits_task, x_test=torch.full_like(digits_task.x_test, float("nan")),
        y_test=torch.randint(0, digits_task.num_classes, digits_task.y_test.shape, generator=generator))
    choices = []
    for task in (digits_task, poisoned):
        twins = train_twins(mlp, inits, seeds, task, Recipe(**{**tiny_zoo["recipe"].__dict__, "checkpoint_every": 5}))
        generated = [Generated("halfway", run_generator(halfway, layout, stack_state_dicts(inits)), 0.01)]
        baselines = build_baselines(zoo.finals, zoo.seeds, zoo.val_accuracy, specs, count_per_baseline=4)
        result = evaluate(model=mlp, specs=specs, task=task, zoo=zoo, twins=twins, generated=generated,
                          baselines=baselines, options=Options(prune_fractions=(0.5,), keep_matrices=False))
        gen = result["generators"]["halfway"]
        choices.append({
            "twins": {k: v.clone() for k, v in twins.final.items()},
            "matched": gen["twins_at_matched_accuracy"]["twin_steps"],
            "reaching": gen["time_to_accuracy"]["twins_reaching"],
            "at_sgd": {name: row["at_sgd_accuracy"]["twin_step"]
                       for name, row in [("halfway", gen), *result["baselines"].items()]},
            "copied": [b.sources for b in baselines],
            "val": gen["val_accuracy"]})
    clean, dirty = choices
    assert len(set(clean["matched"])) > 1 or clean["matched"][0] > 0  # a real choice, not the init everywhere
    assert all(torch.equal(clean["twins"][k], dirty["twins"][k]) for k in clean["twins"])
    assert {k: v for k, v in clean.items() if k != "twins"} == {k: v for k, v in dirty.items() if k != "twins"}


def test_evaluate_command(tiny_zoo, tmp_path, capsys):
    from synthnet.cli import main

    common = [f"paths.root={tmp_path}", f"paths.checkpoints_dir={tiny_zoo['checkpoints_dir']}",
              "target.hidden=[16]", "progress=false", "evaluate.count=3", "evaluate.twin_checkpoints=5"]
    assert main(["evaluate", *common]) == 2
    assert "no generator files (*.safetensors) in" in capsys.readouterr().err
    assert main(["evaluate", *common, "paths.checkpoints_dir=" + str(tmp_path / "none"), "evaluate.generators=[]"]) == 2
    assert "no zoo in" in capsys.readouterr().err
    assert main(["evaluate", *common, "evaluate.generators=[]", "evaluate.novelty_pool=all"]) == 0
    report = json.loads((tmp_path / "digits-mlp" / "reports" / "report.json").read_text())
    assert report["twins"]["count"] == 3 and len(report["zoo"]["seeds"]) == 3
    assert report["zoo"]["pool_size"] == 9  # 3 runs x 3 epochs (the inits are left out)
    assert report["zoo"]["nearest_zoo_distance_aligned"]["min"] > 0  # its own run is left out
    assert report["baselines"]["copy"]["nearest_zoo_distance_aligned"]["max"] == 0
    assert (tmp_path / "digits-mlp" / "reports" / "accuracy_vs_novelty.png").stat().st_size > 0


def test_results_table_needs_markers_and_fills_them(tmp_path):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("results_table", Path(__file__).parents[1] / "bench" / "results_table.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    readme = tmp_path / "README.md"
    readme.write_text("# title\nno markers\n")
    with pytest.raises(SystemExit, match="results:start"):
        bench.main(["--readme", str(readme), "--table-only", "--root", str(tmp_path)])
    readme.write_text(f"# title\n{bench.START}\nold\n{bench.END}\ntail\n")
    stats = {"mean": 0.9, "std": 0.01, "median": 0.9, "min": 0.8, "max": 1.0}
    row = {"test_accuracy": stats, "max_iou_vs_zoo": stats, "nearest_zoo_distance_aligned": stats,
           "diversity_disagreement": 0.1}
    report = {"header": {"machine": "test machine"}, "twins": row, "baselines": {"aligned average": row},
              "generators": {"g": {**row, "input_sensitivity": {"input_insensitive": True},
                                   "placement": {"dominated_by": ["copy"]},
                                   "headline": {k: 0.5 for k in ("accuracy_ratio", "novelty_ratio",
                                                                  "weight_novelty_ratio", "diversity_ratio",
                                                                  "input_sensitivity_ratio",
                                                                  "time_to_accuracy_ratio")}}}}
    (tmp_path / "digits-mlp" / "reports").mkdir(parents=True)
    (tmp_path / "digits-mlp" / "reports" / "report.json").write_text(json.dumps(report))
    assert bench.main(["--readme", str(readme), "--table-only", "--root", str(tmp_path),
                       "--settings", "digits-mlp"]) == 0
    text = readme.read_text()
    assert "old" not in text and text.startswith("# title\n") and text.endswith(f"{bench.END}\ntail\n")
    assert "| digits MLP | g | 0.900 ± 0.010 | 0.500 |" in text and "(insensitive)" in text
    assert "Machine: test machine" in text and "Reproduce: `python bench/results_table.py" in text
    # --settings over another setting rewrites only that setting's rows and keeps the others as they stand
    (tmp_path / "mnist1d-mlp" / "reports").mkdir(parents=True)
    (tmp_path / "mnist1d-mlp" / "reports" / "report.json").write_text(json.dumps(
        {**report, "header": {"machine": "other machine"}}))
    (tmp_path / "mnist1d-mlp" / "stage_times.json").write_text(json.dumps({"zoo": {"cpu_s": 7.0, "wall_s": 4.0}}))
    assert bench.main(["--readme", str(readme), "--table-only", "--root", str(tmp_path),
                       "--settings", "mnist1d-mlp"]) == 0
    merged = readme.read_text()
    assert "| digits MLP | g | 0.900 ± 0.010 | 0.500 |" in merged and "| MNIST-1D MLP | g | 0.900" in merged
    assert merged.index("| digits MLP | g |") < merged.index("| MNIST-1D MLP | g |")
    assert merged.count("| digits MLP | g |") == 1 and merged.count("| MNIST-1D MLP | g |") == 1
    assert "| MNIST-1D MLP | zoo 7 (4) |" in merged and "Machine: other machine; test machine" in merged
    assert "The MNIST-1D MLP rows were then redone with `python bench/results_table.py" in merged
    # rows of every setting in the table redone: nothing kept, the reproduce line is this command alone
    assert bench.main(["--readme", str(readme), "--table-only", "--root", str(tmp_path),
                       "--settings", "digits-mlp", "mnist1d-mlp"]) == 0
    redone = readme.read_text()
    assert "were then redone" not in redone and redone.count("| digits MLP | g |") == 1
    assert "Reproduce: `python bench/results_table.py --table-only" in redone  # where it wrote is not a step
    assert str(readme) not in redone
    # a stage that wrote nothing (the CLI found it done) keeps its last time; a resumed one says so
    out = tmp_path / "generators"
    (out / "resume").mkdir(parents=True)
    (out / "done.safetensors").write_bytes(b"x")
    times = {}
    bench.run = lambda argv: None
    bench.timed(times, "skipped", ["train"], out)
    assert times == {}
    (out / "resume" / "g.safetensors").write_bytes(b"x")

    def finish_resumed(argv):  # continues its state and removes it on finishing, as the task method does
        (out / "g.safetensors").write_bytes(b"y")
        (out / "resume" / "g.safetensors").unlink()

    bench.run = finish_resumed
    bench.timed(times, "resumed", ["train"], out)
    assert list(times) == ["resumed"] and times["resumed"]["resumed"] is True
    (out / "resume" / "kept.safetensors").write_bytes(b"x")  # another, finished stage's state (GRPO keeps it)
    bench.run = lambda argv: (out / "h.safetensors").write_bytes(b"z")
    bench.timed(times, "fresh", ["train"], out)
    assert "resumed" not in times["fresh"] and times["fresh"]["wall_s"] >= 0


def test_cnn_end_to_end_through_evaluate(tmp_path, capsys):
    """zoo -> imitation -> evaluate for a small digits CNN: twins trained one at a time (as its zoo), and a
    report whose twin row reproduces the zoo's recipe on the twins' own inits."""
    from synthnet.cli import main

    common = ["experiment=smoke", "target=cnn", "target.channels=[4]", "target.fc=[]", f"paths.root={tmp_path}",
              "progress=false"]
    assert main(["zoo", *common]) == 0
    assert main(["train", *common]) == 0
    assert main(["evaluate", *common]) == 0
    assert "| perceiver_moe-imitation |" in capsys.readouterr().out
    report = json.loads((tmp_path / "digits-cnn" / "reports" / "report.json").read_text())
    gen = report["generators"]["perceiver_moe-imitation"]
    assert gen["count"] == 3 and gen["time_to_accuracy"]["twin_group_size"] == 1
    assert len(gen["per_step"]) == 3 and 0.0 <= gen["test_accuracy"]["mean"] <= 1.0
    assert report["twins"]["test_accuracy"]["mean"] > 0.5  # 2 epochs of Adam on digits
    assert report["twins"]["curve"]["group_size"] == 1
    assert report["header"]["target_config"]["channels"] == [4]
