"""Generators: shapes, symmetry under hidden-neuron permutations, MoE bookkeeping, files, sampling."""

from __future__ import annotations

import math

import pytest
import torch

from synthnet.errors import SynthNetError
from synthnet.generation import generate_networks, target_layout
from synthnet.generators import GENERATORS, build_generator, load_generator, save_generator
from synthnet.methods.imitation import apply_index, permutation_index
from synthnet.storage import save_state_dict
from synthnet.targets import build_target, permute_hidden, random_permutations
from synthnet.tokenization import KINDS, detokenize, token_permutation, tokenize

TARGET = {"name": "mlp", "hidden": [12, 8], "activation": "relu"}
TASK = {"name": "digits"}
SMALL = {"d_model": 32, "num_latents": 8, "num_blocks": 2, "num_heads": 4, "num_experts": 4, "top_k": 2}


def _setup(neuron_messages=True, seed=0, **options):
    template, layout = target_layout(TARGET, (1, 8, 8), 10, 16)
    torch.manual_seed(seed)
    model = build_generator({"name": "perceiver_moe", "neuron_messages": neuron_messages, **SMALL, **options}, layout)
    with torch.no_grad():  # leave the identity-at-init state: every path must contribute
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    states = [build_target(TARGET, (1, 8, 8), 10).state_dict() for _ in range(3)]
    tokens = tokenize({k: torch.stack([s[k] for s in states]) for k in states[0]}, layout)
    return template, layout, model.eval(), tokens, states


def _times(n):
    return torch.full((n,), 0.25), torch.full((n,), 0.75)


@pytest.mark.parametrize("name", sorted(GENERATORS))
@pytest.mark.parametrize("predict", ["delta", "direct"])
def test_output_has_the_input_structure(name, predict):
    _, layout = target_layout(TARGET, (1, 8, 8), 10, 16)
    options = SMALL if name == "perceiver_moe" else {"hidden": 32}
    model = build_generator({"name": name, "predict": predict, **options}, layout)
    tokens = torch.randn(2, layout.num_tokens, 16) * layout.mask
    out = model(tokens, *_times(2), layout)
    assert out.shape == tokens.shape and torch.isfinite(out).all()
    assert torch.all(out[:, ~layout.mask] == 0)
    if predict == "delta":  # zero-initialised head: an untrained delta generator is the identity
        assert torch.allclose(out, tokens)
    aux = model.auxiliary_loss()
    assert aux.dim() == 0 and torch.isfinite(aux)
    assert (aux > 0) if name == "perceiver_moe" else (aux == 0)


def test_unknown_options_and_generators_are_refused():
    _, layout = target_layout(TARGET, (1, 8, 8), 10, 16)
    with pytest.raises(SynthNetError, match="generator.widht"):
        build_generator({"name": "perceiver_moe", "widht": 3}, layout)
    with pytest.raises(SynthNetError, match="unknown generator"):
        build_generator({"name": "nope"}, layout)


def test_row_permutation_within_a_hidden_layer_permutes_the_output_exactly():
    """Without neuron messages the Perceiver sees a hidden layer as a set of tokens."""
    _, layout, model, tokens, _ = _setup(neuron_messages=False)
    perms = [torch.randperm(12), torch.randperm(8)]
    index = token_permutation(layout, perms)
    with torch.no_grad():
        out = model(tokens, *_times(3), layout)
        out_perm = model(tokens[:, index], *_times(3), layout)
    assert torch.allclose(out_perm, out[:, index], atol=1e-5)
    assert not torch.allclose(out_perm, out, atol=1e-3)  # and it really did move


@pytest.mark.parametrize("neuron_messages", [True, False])
def test_row_mean_scaling_damps_only_the_update_a_neurons_weights_share(neuron_messages):
    """generator.row_mean_scaling: of each neuron's weight update, the mean over its incoming weights is
    divided by sqrt(fan_in); what is left of the weights' update and the bias's update is the plain
    generator's, and a row permutation still permutes the output exactly."""
    _, layout, plain, tokens, _ = _setup(neuron_messages=neuron_messages)
    _, _, scaled, _, _ = _setup(neuron_messages=neuron_messages, row_mean_scaling=True)
    scaled.load_state_dict(plain.state_dict())  # the option adds no parameters: the same generator
    with torch.no_grad():
        delta = detokenize(plain(tokens, *_times(3), layout) - tokens, layout)
        damped = detokenize(scaled(tokens, *_times(3), layout) - tokens, layout)
    for layer in layout.layers:
        rows, rows_damped = delta[layer.weight].flatten(2), damped[layer.weight].flatten(2)
        mean, mean_damped = rows.mean(-1, keepdim=True), rows_damped.mean(-1, keepdim=True)
        assert mean.abs().max() > 1e-3  # there was a shared part to damp
        assert torch.allclose(mean_damped, mean / math.sqrt(layer.fan_in), atol=1e-6)
        assert torch.allclose(rows_damped - mean_damped, rows - mean, atol=1e-6)
        assert torch.allclose(damped[layer.bias], delta[layer.bias], atol=1e-6)
    if not neuron_messages:
        index = token_permutation(layout, [torch.randperm(12), torch.randperm(8)])
        with torch.no_grad():
            out = scaled(tokens, *_times(3), layout)
            assert torch.allclose(scaled(tokens[:, index], *_times(3), layout), out[:, index], atol=1e-5)


def test_role_depth_feature_equals_relative_up_to_two_hidden_layers_and_repeats_the_middle_beyond():
    """generator.depth_feature=role: one or two hidden layers get exactly the relative depth's features (a
    generator trained there is the same either way); deeper networks give every layer between the first and
    the read-out the features of the middle layer, where relative depth gives values never seen in training."""
    _, _, relative, _, _ = _setup()
    _, _, role, _, _ = _setup(depth_feature="role")
    role.load_state_dict(relative.state_dict())  # no parameters of its own
    for hidden in ([12], [12, 8]):
        _, layout = target_layout({**TARGET, "hidden": hidden}, (1, 8, 8), 10, 16)
        assert torch.equal(role.token_features(layout), relative.token_features(layout))
    _, deep = target_layout({**TARGET, "hidden": [12, 8, 8]}, (1, 8, 8), 10, 16)
    column = len(KINDS)  # the depth feature follows the kind one-hot
    depth = {name: model.token_features(deep)[:, column] for name, model in (("relative", relative), ("role", role))}
    layer = deep.layer_index
    assert sorted(set(depth["relative"].tolist())) == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert sorted(set(depth["role"].tolist())) == [0, 0.5, 1]
    assert torch.all(depth["role"][(layer == 1) | (layer == 2)] == 0.5)
    tokens = torch.randn(2, deep.num_tokens, 16) * deep.mask
    with torch.no_grad():
        assert not torch.allclose(role(tokens, *_times(2), deep), relative(tokens, *_times(2), deep))
    with pytest.raises(SynthNetError, match="depth_feature"):
        _setup(depth_feature="absolute")


def _true_permutation(template, layout, states, seed=3):
    """A function-preserving permutation of the hidden units of ``states``: the permuted states' tokens and the
    token-value index that maps the original tokens onto them."""
    specs = template.layer_specs()
    perms = random_permutations(specs, states[0], torch.Generator().manual_seed(seed))
    permuted_states = [permute_hidden(s, specs, perms) for s in states]
    permuted = tokenize({k: torch.stack([s[k] for s in permuted_states]) for k in states[0]}, layout)
    return permuted_states, permuted, permutation_index(layout, specs, perms).expand(len(states), -1)


def test_true_hidden_permutation_is_not_exactly_equivariant():
    """A function-preserving permutation moves the rows of layer l *and* the values inside the
    tokens of layer l + 1. The per-token path reads those values in a fixed order, so the output
    is not exactly the permuted output; the neuron-message paths, which follow the connections,
    keep the deviation smaller than what an unrelated network would give."""
    template, layout, model, tokens, states = _setup(neuron_messages=True)
    permuted_states, permuted, index = _true_permutation(template, layout, states)
    # the permuted input computes the same function and is the token-level picture the docstring describes
    x = torch.randn(5, 1, 8, 8)
    template.load_state_dict(states[0])
    y0 = template(x)
    template.load_state_dict(permuted_states[0])
    assert torch.allclose(template(x), y0, atol=1e-5)
    with torch.no_grad():
        out = model(tokens, *_times(3), layout)
        out_perm = model(permuted, *_times(3), layout)
    assert torch.equal(apply_index(tokens, index), permuted)  # the same map, on tokens
    expected = apply_index(out, index)  # what exact equivariance would give
    error = (out_perm - expected).abs().max()
    assert error > 1e-4  # not exactly equivariant ...
    unrelated = (out_perm - out[[1, 2, 0]]).abs().max()
    assert error < unrelated  # ... but far closer than another network's output


@pytest.mark.parametrize("options", [{}, {"predict": "direct"}, {"decoder_messages": True, "row_mean_scaling": True}])
def test_set_rows_make_a_true_hidden_permutation_exactly_equivariant(options):
    """With ``set_rows`` no path reads a value of a hidden-fed row by its slot: permuting hidden units (rows of
    layer l, columns of layer l + 1) permutes the output the same way, to float rounding, where the default
    generator is off by far more (the test above); also on a width it was not built for, whose rows span two
    tokens."""
    _, layout, model, _, _ = _setup(neuron_messages=True, set_rows=True, **options)
    assert model.set_layers(layout) == [False, True, True]  # the first layer reads labelled inputs
    for target in (TARGET, {**TARGET, "hidden": [20, 8]}):
        template, layout = target_layout(target, (1, 8, 8), 10, 16)
        states = [build_target(target, (1, 8, 8), 10).state_dict() for _ in range(3)]
        tokens = tokenize({k: torch.stack([s[k] for s in states]) for k in states[0]}, layout)
        _, permuted, index = _true_permutation(template, layout, states)
        with torch.no_grad():
            out = model(tokens, *_times(3), layout)
            out_perm = model(permuted, *_times(3), layout)
        assert (out_perm - apply_index(out, index)).abs().max() < 1e-5, target
        assert (out - tokens).abs().max() > 0.1  # and the generator really changed the weights
    with pytest.raises(SynthNetError, match="set_rows needs"):
        _setup(neuron_messages=False, set_rows=True)


@pytest.mark.parametrize("neuron_messages", [True, False])
def test_messages_follow_the_connections(neuron_messages):
    """Changing hidden unit j's outgoing weights changes what the generator writes for unit j's
    incoming weights more than for any other unit's (messages run along the connections);
    without messages the change reaches every unit alike, through the latents."""
    from synthnet.tokenization import detokenize

    template, layout, model, tokens, _ = _setup(neuron_messages=neuron_messages)
    first, second = template.layer_specs()[:2]
    state = detokenize(tokens[:1], layout)
    j = 5
    nudged = {k: v.clone() for k, v in state.items()}
    nudged[second.weight][0, :, j] += 3.0  # unit j's outgoing weights (a column of the next layer)
    with torch.no_grad():
        out = detokenize(model(tokens[:1], *_times(1), layout), layout)
        moved = detokenize(model(tokenize(nudged, layout), *_times(1), layout), layout)
    change = (moved[first.weight][0] - out[first.weight][0]).abs().sum(1)  # per unit of the first layer
    others = torch.cat([change[:j], change[j + 1:]])
    assert others.max() > 0  # the latents carry some of it everywhere
    if neuron_messages:  # unit j moves most, about twice the others' mean or more
        assert int(change.argmax()) == j and change[j] > 1.5 * others.mean()
    else:  # no route from unit j's outgoing weights to its incoming ones: j is like any other unit
        assert change[j] < 1.3 * others.mean()


@pytest.fixture(scope="module")
def width_trained(digits_task, tiny_zoo):
    """A small generator trained on digits MLPs 64-16-10 only: imitation on the tiny zoo, then the task loss
    on fresh inits (the curriculum of ``synthnet train``)."""
    from synthnet.generation import init_tokens
    from synthnet.methods.data import load_zoo_tokens
    from synthnet.methods.imitation import EMA, ImitationSettings, layer_value_weights, lr_factor, train_imitation
    from synthnet.methods.task import TaskSettings, task_step

    target_config = tiny_zoo["target"]
    assert target_config["hidden"] == [16]
    target, layout = target_layout(target_config, digits_task.input_shape, digits_task.num_classes, 32)
    torch.manual_seed(0)
    model = build_generator({"name": "perceiver_moe", "chunk_size": 32, "d_model": 32, "num_latents": 8,
                             "num_blocks": 1, "num_heads": 2, "num_experts": 2, "top_k": 1, "time_dim": 16,
                             "message_rank": 8}, layout)
    zoo = load_zoo_tokens(tiny_zoo["checkpoints_dir"], layout, target.layer_specs(), target.state_dict(),
                          target_config=target_config)
    train_imitation(model, torch.optim.AdamW(model.parameters(), lr=3e-3), zoo,
                    ImitationSettings(steps=60, batch_size=12, lr=3e-3, warmup_steps=5, noise_std=0.0),
                    ema=EMA(model, 0.0))
    settings = TaskSettings(inits_per_step=4, batch_size=128, generation_steps=2, anchor_weight=0.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    weights = layer_value_weights(layout)
    data = torch.Generator().manual_seed(0)
    model.train()
    for step in range(STEPS_UNSEEN):
        for group in optimizer.param_groups:
            group["lr"] = 2e-3 * lr_factor(step, STEPS_UNSEEN, 10, 0.1)
        inits = init_tokens(target_config, digits_task.input_shape, digits_task.num_classes,
                            range(4_000_000 + 4 * step, 4_000_004 + 4 * step), layout)
        index = torch.randint(0, len(digits_task.y_train), (128,), generator=data)
        result = task_step(model, None, inits, layout, target, digits_task.x_train[index],
                           digits_task.y_train[index], settings, weights)
        optimizer.zero_grad()
        result.loss.backward()
        optimizer.step()
    return model.eval()


STEPS_UNSEEN = 300


def _val_accuracy(model, hidden, digits_task):
    from synthnet.evaluation.scoring import accuracy_and_loss

    target_config = {"name": "mlp", "hidden": hidden, "activation": "relu"}
    template, layout = target_layout(target_config, digits_task.input_shape, digits_task.num_classes, 32)
    out = generate_networks(model, layout, target_config, digits_task.input_shape, digits_task.num_classes,
                            range(5_000_000, 5_000_008), 2)
    return float(accuracy_and_loss(template, out.state_dicts[-1], digits_task.x_val, digits_task.y_val)[0].mean())


def test_generator_trained_on_one_width_serves_unseen_widths(width_trained, digits_task):
    """Tokens describe units, not positions in a fixed vector: a generator trained on 16 hidden units
    makes networks far above chance (0.1) with 12, 24 and 32 (held-out inits, validation split; measured
    when written: 0.72 on 16, 0.50-0.56 on the others)."""
    assert _val_accuracy(width_trained, [16], digits_task) > 0.6
    for hidden in ([12], [24], [32]):
        assert _val_accuracy(width_trained, hidden, digits_task) > 0.4, hidden


@pytest.mark.xfail(strict=True, reason="depth does not transfer yet: 64-16-16-10 stays at chance, 0.05 (issue 9)")
def test_generator_trained_on_one_depth_serves_an_unseen_depth(width_trained, digits_task):
    assert _val_accuracy(width_trained, [16, 16], digits_task) > 0.4


def test_every_expert_takes_part_and_usage_is_reported():
    _, layout, model, tokens, _ = _setup()
    moe = model.moe_layers()[0]
    with torch.no_grad():  # route everything to experts 0 and 1
        moe.router.weight.zero_()
        moe.router.bias.copy_(torch.tensor([5.0, 4.0, -5.0, -5.0]))
    model.train()
    out = model(tokens, *_times(3), layout)
    (out.square().sum() + model.auxiliary_loss()).backward()
    for expert in moe.experts:  # empty slices still put every parameter in the graph (DDP)
        assert all(p.grad is not None for p in expert.parameters())
    assert all(p.grad.abs().sum() == 0 for p in moe.experts[3].parameters())
    usage = model.expert_usage()
    assert len(usage["fraction"]) == 2 and math.isclose(sum(usage["fraction"][0]), 1.0, abs_tol=1e-3)
    assert usage["fraction"][0][2] == 0 and usage["balance_loss"] > 1.0  # imbalance is penalised


def test_save_and_load_round_trip(tmp_path):
    _, layout, model, tokens, _ = _setup()
    path = tmp_path / "g.safetensors"
    config = {"name": "perceiver_moe", "neuron_messages": True, **SMALL}
    save_generator(path, model, config=config, target_config=TARGET, task_config=TASK, chunk_size=16,
                   extra={"step": 7})
    loaded = load_generator(path)
    assert not loaded.model.training and loaded.chunk_size == 16 and loaded.metadata["step"] == 7
    assert loaded.config == config and loaded.target_config == TARGET
    with torch.no_grad():
        assert torch.equal(loaded.model(tokens, *_times(3), layout), model(tokens, *_times(3), layout))
    flat = build_generator({"name": "flat_mlp", "hidden": 16}, layout)
    save_generator(tmp_path / "f.safetensors", flat, config={"name": "flat_mlp", "hidden": 16},
                   target_config=TARGET, task_config=TASK, chunk_size=16)
    assert load_generator(tmp_path / "f.safetensors").model.num_values == layout.num_values


def test_bad_generator_files_give_clear_errors(tmp_path):
    with pytest.raises(SynthNetError, match="no generator file"):
        load_generator(tmp_path / "missing.safetensors")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x10\x00garbage")
    with pytest.raises(SynthNetError, match="corrupt"):
        load_generator(tmp_path / "corrupt.safetensors")
    save_state_dict(tmp_path / "weights.safetensors", {"w": torch.zeros(2)}, {"seed": 1})
    with pytest.raises(SynthNetError, match="not a SynthNet generator"):
        load_generator(tmp_path / "weights.safetensors")


def test_stochastic_log_probs_match_the_gaussian_closed_form():
    _, layout, model, _, _ = _setup()
    sigma = 0.05
    out = generate_networks(model, layout, TARGET, (1, 8, 8), 10, [1000000, 1000001], 3, noise_scale=sigma,
                            rng=torch.Generator().manual_seed(0))
    result = out.result
    assert result.log_probs.shape == (2, 3)
    valid = layout.mask
    for k in range(3):
        residual = (result.trajectory[k + 1] - result.means[k])[:, valid]  # (B, V)
        closed = (-0.5 * (residual / sigma) ** 2 - math.log(sigma) - 0.5 * math.log(2 * math.pi)).mean(-1)
        normal = torch.distributions.Normal(result.means[k][:, valid], sigma).log_prob(
            result.trajectory[k + 1][:, valid]).mean(-1)
        assert torch.allclose(result.log_probs[:, k], closed, atol=1e-4)
        assert torch.allclose(result.log_probs[:, k], normal, atol=1e-4)
    assert len(out.state_dicts) == 4 and out.state_dicts[0]["layers.0.weight"].shape == (2, 12, 64)


def test_deterministic_generation_is_reproducible_and_starts_from_the_targets_init():
    from synthnet.targets import init_state_dict
    _, layout, model, _, _ = _setup()
    a = generate_networks(model, layout, TARGET, (1, 8, 8), 10, [1000000, 1000001], 2)
    b = generate_networks(model, layout, TARGET, (1, 8, 8), 10, [1000000, 1000001], 2)
    assert all(torch.equal(a.state_dicts[-1][k], b.state_dicts[-1][k]) for k in a.state_dicts[-1])
    init = init_state_dict(TARGET, (1, 8, 8), 10, 1000001)
    assert all(torch.equal(a.state_dicts[0][k][1], init[k]) for k in init)
    assert a.result.log_probs is None


def _probed(seed=0, **options):
    template, layout = target_layout(TARGET, (1, 8, 8), 10, 16)
    torch.manual_seed(seed)
    model = build_generator({"name": "perceiver_moe", "probes": 6, "probe_values": 64, **SMALL, **options}, layout)
    return template, layout, model.eval()


def test_probe_features_follow_a_true_hidden_permutation_exactly():
    """Each neuron's probe features come from what it computes on the learned probe inputs, so a function-
    preserving permutation of hidden units (rows of layer l and columns of layer l + 1) permutes them with the
    units, to float rounding, though the values inside the next layer's tokens moved."""
    template, layout, model = _probed()
    specs = template.layer_specs()
    states = [build_target(TARGET, (1, 8, 8), 10).state_dict() for _ in range(3)]
    perms = random_permutations(specs, states[0], torch.Generator().manual_seed(3))
    tokens = tokenize({k: torch.stack([s[k] for s in states]) for k in states[0]}, layout)
    permuted_states = [permute_hidden(s, specs, perms) for s in states]
    permuted = tokenize({k: torch.stack([s[k] for s in permuted_states]) for k in states[0]}, layout)
    index = token_permutation(layout, perms)  # whole tokens move with their unit
    with torch.no_grad():
        features = model._probe_features(tokens, layout)
        moved = model._probe_features(permuted, layout)
        other = model._probe_features(tokens[[1, 2, 0]], layout)
    assert torch.allclose(moved, features[:, index], atol=1e-5)
    assert not torch.allclose(moved, features, atol=1e-3)  # the units really moved
    assert (other - features).abs().max() > 1e-2  # and another network is described differently


def test_probe_features_describe_what_a_unit_computes_beyond_its_own_weights():
    """A unit of the second hidden layer whose incoming weights are unchanged gets other features when the
    first layer (what its inputs compute) changes: the description no row of weights alone can give."""
    _, layout, model = _probed()
    state = build_target(TARGET, (1, 8, 8), 10).state_dict()
    changed = {**state, "layers.0.weight": torch.randn_like(state["layers.0.weight"]) * 0.2}
    with torch.no_grad():
        a = model._probe_features(tokenize(state, layout)[None], layout)
        b = model._probe_features(tokenize(changed, layout)[None], layout)
    second = layout.layers[1]
    rows = slice(second.first_token, second.first_token + second.num_tokens)
    assert torch.equal(tokenize(state, layout)[rows], tokenize(changed, layout)[rows])
    assert (a[:, rows] - b[:, rows]).abs().max() > 1e-2


def test_probes_are_learned_and_need_the_target_network():
    template, layout, model = _probed()
    tokens = tokenize(template.state_dict(), layout)[None]
    model.train()
    model(tokens, *_times(1), layout).pow(2).sum().backward()  # the head is zero at init: the gradient
    assert model.probe_inputs.grad is None or model.probe_inputs.grad.abs().sum() == 0  # reaches the head only
    with torch.no_grad():
        model.head.weight.normal_(0, 0.1)
    model.zero_grad()
    model(tokens, *_times(1), layout).pow(2).sum().backward()
    assert model.probe_inputs.grad.abs().sum() > 0  # then the probe inputs themselves are trained
    from synthnet.tokenization import build_layout
    bare = build_layout(template.layer_specs(), template.state_dict(), 16)  # no network in it
    with pytest.raises(SynthNetError, match="needs the target network"):
        model(tokens, *_times(1), bare)
    _, _, small = _probed(probe_values=32)
    with pytest.raises(SynthNetError, match="probe_values"):
        small(tokens, *_times(1), layout)
