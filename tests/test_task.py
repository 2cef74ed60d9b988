"""The task-loss method: a step lowers held-out loss, the anchor and step weights do what they say,
selection never reads the test split, resume is exact, and the CLI runs the curriculum."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from synthnet.cli import main
from synthnet.errors import SynthNetError
from synthnet.generation import init_tokens, target_layout
from synthnet.generators import build_generator
from synthnet.methods.imitation import layer_value_weights
from synthnet.methods.task import TaskSettings, network_loss, task_step, unroll, validation_metrics
from synthnet.storage import read_metadata

TARGET = {"name": "mlp", "hidden": [16], "activation": "relu"}
GENERATOR = {"name": "perceiver_moe", "chunk_size": 32, "d_model": 32, "num_latents": 8, "num_blocks": 1,
             "num_heads": 2, "num_experts": 2, "top_k": 1, "time_dim": 16, "message_rank": 8}


@pytest.fixture()
def setup(digits_task):
    torch.manual_seed(0)
    target, layout = target_layout(TARGET, digits_task.input_shape, digits_task.num_classes, 32)
    model = build_generator(GENERATOR, layout)
    return target, layout, model


def _inits(digits_task, layout, first, count=4):
    return init_tokens(TARGET, digits_task.input_shape, digits_task.num_classes, range(first, first + count), layout)


def test_network_loss_is_the_cross_entropy_of_each_generated_network(setup, digits_task):
    target, layout, _ = setup
    tokens = _inits(digits_task, layout, 0, 3)
    x, y = digits_task.x_train[:50], digits_task.y_train[:50]
    loss, accuracy = network_loss(target, tokens, layout, x, y)
    from synthnet.tokenization import detokenize
    expected, expected_acc = [], []
    for i in range(3):
        target.load_state_dict({k: v[i] for k, v in detokenize(tokens, layout).items()})
        logits = target(x)
        expected.append(torch.nn.functional.cross_entropy(logits, y))
        expected_acc.append((logits.argmax(-1) == y).float().mean())
    assert torch.allclose(loss, torch.stack(expected).mean(), atol=1e-5)
    assert torch.allclose(accuracy, torch.stack(expected_acc))


@pytest.fixture(scope="module")
def imitation_generator(tiny_zoo, digits_task):
    """The small generator after 60 imitation steps on the tiny zoo: a realistic start for the task loss."""
    from synthnet.methods.data import load_zoo_tokens
    from synthnet.methods.imitation import EMA, ImitationSettings, train_imitation

    target, layout = target_layout(TARGET, digits_task.input_shape, digits_task.num_classes, 32)
    zoo = load_zoo_tokens(tiny_zoo["checkpoints_dir"], layout, target.layer_specs(), target.state_dict(),
                          target_config=TARGET)
    torch.manual_seed(0)
    model = build_generator(GENERATOR, layout)
    train_imitation(model, torch.optim.AdamW(model.parameters(), lr=3e-3), zoo,
                    ImitationSettings(steps=60, batch_size=12, lr=3e-3, warmup_steps=5, noise_std=0.0),
                    ema=EMA(model, 0.0))
    return model.state_dict()


def test_one_step_lowers_the_loss_on_held_out_inits_and_examples(setup, digits_task, imitation_generator):
    target, layout, model = setup
    model.load_state_dict(imitation_generator)
    settings = TaskSettings(generation_steps=2, anchor_weight=0.0)
    weights = layer_value_weights(layout)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    held_out_inits = _inits(digits_task, layout, 900, 8)

    def held_out_loss():
        with torch.no_grad():
            states, _ = unroll(model, held_out_inits, layout, 2)
            return float(network_loss(target, states[-1], layout, digits_task.x_val, digits_task.y_val)[0])

    before = held_out_loss()
    # other inits and other examples (training split) than the held-out ones (validation split)
    result = task_step(model, None, _inits(digits_task, layout, 0, 8), layout, target, digits_task.x_train[:200],
                       digits_task.y_train[:200], settings, weights)
    optimizer.zero_grad()
    result.loss.backward()
    optimizer.step()
    assert held_out_loss() < before - 0.1


def test_anchor_is_zero_at_the_reference_and_pulls_towards_it(setup, digits_task):
    target, layout, model = setup
    import copy
    reference = copy.deepcopy(model)
    with torch.no_grad():  # make the generator do something, so the anchor is not trivially zero
        model.head.bias.normal_(0, 0.1)
        reference.head.bias.copy_(model.head.bias)
    settings = TaskSettings(generation_steps=2, anchor_weight=1.0)
    weights = layer_value_weights(layout)
    inits = _inits(digits_task, layout, 0)
    x, y = digits_task.x_train[:64], digits_task.y_train[:64]
    assert task_step(model, reference, inits, layout, target, x, y, settings, weights).anchor == pytest.approx(0, abs=1e-10)
    with torch.no_grad():
        model.head.bias.add_(0.5)
    far = task_step(model, reference, inits, layout, target, x, y, settings, weights)
    states, _ = unroll(model, inits, layout, 2)
    with torch.no_grad():
        reference_states, _ = unroll(reference, inits, layout, 2)
    from synthnet.methods.imitation import layer_mse
    expected = sum(float(layer_mse(s.detach(), r, weights)) for s, r in zip(states, reference_states)) / 2
    assert far.anchor == pytest.approx(expected, rel=1e-5) and far.anchor > 1e-3
    no_anchor = task_step(model, reference, inits, layout, target, x, y, TaskSettings(generation_steps=2,
                                                                                          anchor_weight=0.0), weights)
    assert float((far.loss - no_anchor.loss).detach()) == pytest.approx(far.anchor, rel=1e-4)


def test_step_weights_select_which_networks_count(setup, digits_task):
    target, layout, model = setup
    weights = layer_value_weights(layout)
    inits = _inits(digits_task, layout, 0)
    x, y = digits_task.x_train[:64], digits_task.y_train[:64]
    with torch.no_grad():
        model.head.bias.normal_(0, 0.3)
        states, _ = unroll(model, inits, layout, 2)
        first = float(network_loss(target, states[0], layout, x, y)[0])
        last = float(network_loss(target, states[1], layout, x, y)[0])
    only_first = task_step(model, None, inits, layout, target, x, y,
                           TaskSettings(generation_steps=2, step_weights=(1.0, 0.0)), weights)
    even = task_step(model, None, inits, layout, target, x, y,
                     TaskSettings(generation_steps=2, step_weights=(1.0, 1.0)), weights)
    assert only_first.task_loss == pytest.approx(first, rel=1e-4)
    assert even.task_loss == pytest.approx((first + last) / 2, rel=1e-4)
    assert TaskSettings(generation_steps=3).weights == [0.0, 0.0, 1.0]
    with pytest.raises(SynthNetError, match="one weight per generation step"):
        TaskSettings(generation_steps=3, step_weights=(1.0,))


def test_validation_metrics_see_a_collapse(setup, digits_task):
    target, layout, model = setup
    inits = _inits(digits_task, layout, 0, 6)
    identity = validation_metrics(lambda x, s, t, l: x, inits, layout, 2, target, digits_task.x_val, digits_task.y_val)
    assert identity["init_cosine"] == pytest.approx(1.0) and identity["output_spread"] == pytest.approx(1.0)
    one_network = inits[:1].clone()
    collapsed = validation_metrics(lambda x, s, t, l: one_network.expand_as(x), inits, layout, 2, target,
                                   digits_task.x_val, digits_task.y_val)
    assert collapsed["output_spread"] == pytest.approx(0.0, abs=1e-6) and collapsed["val_disagreement"] == 0.0


# --------------------------------------------------------------------------- through the CLI

STEPS = ["method.steps=6", "method.save_every=2", "method.eval_every=2", "method.log_every=2", "method.patience=0"]


def _args(tiny_zoo, root, *extra):
    return ["experiment=smoke_task", f"paths.root={root}", f"paths.checkpoints_dir={tiny_zoo['checkpoints_dir']}",
            "target.hidden=[16]", "progress=false", *extra]


def _generator(root, name="perceiver_moe-task"):
    return root / "digits-mlp" / "generators" / f"{name}.safetensors"


def test_curriculum_trains_imitation_then_task_and_marks_the_file_finished(tiny_zoo, tmp_path):
    assert main(["train", *_args(tiny_zoo, tmp_path, *STEPS)]) == 0
    imitation, task = _generator(tmp_path, "perceiver_moe-imitation"), _generator(tmp_path)
    assert imitation.exists() and task.exists()
    meta = read_metadata(task)
    assert meta["finished"] is True and meta["method"] == "task" and meta["source"] == str(imitation)
    assert 1 <= meta["best_step"] <= 6 and not (task.parent / "resume" / task.name).exists()
    records = [line for line in (task.parent / "perceiver_moe-task.metrics.jsonl").read_text().splitlines()]
    assert sum('"val_accuracy"' in r for r in records) == 3  # steps 2, 4, 6
    # not retrained when asked again with the same settings
    assert main(["train", *_args(tiny_zoo, tmp_path, *STEPS)]) == 0
    assert read_metadata(task)["fingerprint"] == meta["fingerprint"]


def test_selection_never_reads_the_test_split(tiny_zoo, tmp_path, monkeypatch):
    import synthnet.tasks as tasks

    assert main(["train", *_args(tiny_zoo, tmp_path / "clean", *STEPS)]) == 0
    real = tasks.build_task

    def poisoned(config, data_dir):
        task = real(config, data_dir)
        y = torch.randint(0, task.num_classes, task.y_test.shape, generator=torch.Generator().manual_seed(1))
        return type(task)(**{**task.__dict__, "x_test": torch.full_like(task.x_test, float("nan")), "y_test": y})

    monkeypatch.setattr(tasks, "build_task", poisoned)
    assert main(["train", *_args(tiny_zoo, tmp_path / "poisoned", *STEPS)]) == 0
    a, b = load_file(str(_generator(tmp_path / "clean"))), load_file(str(_generator(tmp_path / "poisoned")))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_metadata(_generator(tmp_path / "clean"))["best_step"] == \
        read_metadata(_generator(tmp_path / "poisoned"))["best_step"]


def test_task_training_resumes_exactly(tiny_zoo, tmp_path, monkeypatch):
    import synthnet.methods.task as task_module

    assert main(["train", *_args(tiny_zoo, tmp_path / "straight", *STEPS)]) == 0
    real = task_module.train_task

    def interrupted(*args, on_save=None, **kwargs):
        def save_then_stop(state):
            on_save(state)
            if state.step == 4:
                raise KeyboardInterrupt
        return real(*args, on_save=save_then_stop, **kwargs)

    monkeypatch.setattr(task_module, "train_task", interrupted)
    assert main(["train", *_args(tiny_zoo, tmp_path / "resumed", *STEPS)]) == 130
    folder = _generator(tmp_path / "resumed").parent
    assert (folder / "resume" / "perceiver_moe-task.safetensors").exists()
    assert not _generator(tmp_path / "resumed").exists()  # nothing unfinished where evaluate looks
    monkeypatch.setattr(task_module, "train_task", real)
    assert main(["train", *_args(tiny_zoo, tmp_path / "resumed", *STEPS)]) == 0
    a, b = load_file(str(_generator(tmp_path / "straight"))), load_file(str(_generator(tmp_path / "resumed")))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    lines = (folder / "perceiver_moe-task.metrics.jsonl").read_text().splitlines()
    straight = (_generator(tmp_path / "straight").parent / "perceiver_moe-task.metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(straight)  # no duplicated rows after the resume


def test_from_scratch_needs_no_imitation_and_has_no_anchor(tiny_zoo, tmp_path):
    assert main(["train", *_args(tiny_zoo, tmp_path, *STEPS, "method.from_scratch=true",
                                 "generator.d_model=32", "generator.num_latents=8")]) == 0
    assert not _generator(tmp_path, "perceiver_moe-imitation").exists()
    meta = read_metadata(_generator(tmp_path, "perceiver_moe-task-scratch"))
    assert meta["from_scratch"] is True and meta["source"] is None


def test_fresh_start_anchors_to_the_init(tiny_zoo, tmp_path):
    assert main(["train", *_args(tiny_zoo, tmp_path, *STEPS, "method.start=fresh", "method.anchor_weight=0.5")]) == 0
    assert not _generator(tmp_path, "perceiver_moe-imitation").exists()
    path = _generator(tmp_path, "perceiver_moe-task-fresh")
    meta = read_metadata(path)
    assert meta["start"] == "fresh" and meta["from_scratch"] is False and meta["finished"] is True
    import json
    logged = [json.loads(line) for line in path.with_name("perceiver_moe-task-fresh.metrics.jsonl").read_text().splitlines()]
    assert any(r.get("anchor", 0) > 0 for r in logged)  # the distance to the init is part of the loss


def test_bad_task_options_are_one_line_errors(tiny_zoo, tmp_path, capsys):
    assert main(["train", *_args(tiny_zoo, tmp_path, "method.step_weights=[1,2,3]")]) == 2
    assert "step_weights" in capsys.readouterr().err
    assert main(["train", *_args(tiny_zoo, tmp_path, "method.first_seed=5000000")]) == 2
    assert "overlaps the validation inits" in capsys.readouterr().err
    assert main(["train", *_args(tiny_zoo, tmp_path, "method.start=zoo")]) == 2
    assert "method.start must be" in capsys.readouterr().err
