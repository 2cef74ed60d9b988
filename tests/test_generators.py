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
from synthnet.tokenization import token_permutation, tokenize

TARGET = {"name": "mlp", "hidden": [12, 8], "activation": "relu"}
TASK = {"name": "digits"}
SMALL = {"d_model": 32, "num_latents": 8, "num_blocks": 2, "num_heads": 4, "num_experts": 4, "top_k": 2}


def _setup(neuron_messages=True, seed=0):
    template, layout = target_layout(TARGET, (1, 8, 8), 10, 16)
    torch.manual_seed(seed)
    model = build_generator({"name": "perceiver_moe", "neuron_messages": neuron_messages, **SMALL}, layout)
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


def test_true_hidden_permutation_is_not_exactly_equivariant():
    """A function-preserving permutation moves the rows of layer l *and* the values inside the
    tokens of layer l + 1. The per-token path reads those values in a fixed order, so the output
    is not exactly the permuted output; the neuron-message paths, which follow the connections,
    keep the deviation smaller than what an unrelated network would give."""
    template, layout, model, tokens, states = _setup(neuron_messages=True)
    specs = template.layer_specs()
    perms = random_permutations(specs, states[0], torch.Generator().manual_seed(3))
    permuted_states = [permute_hidden(s, specs, perms) for s in states]
    permuted = tokenize({k: torch.stack([s[k] for s in permuted_states]) for k in states[0]}, layout)
    # the permuted input computes the same function and is the token-level picture the docstring describes
    x = torch.randn(5, 1, 8, 8)
    template.load_state_dict(states[0])
    y0 = template(x)
    template.load_state_dict(permuted_states[0])
    assert torch.allclose(template(x), y0, atol=1e-5)
    with torch.no_grad():
        out = model(tokens, *_times(3), layout)
        out_perm = model(permuted, *_times(3), layout)
    index = permutation_index(layout, specs, perms).expand(3, -1)
    assert torch.equal(apply_index(tokens, index), permuted)  # the same map, on tokens
    expected = apply_index(out, index)  # what exact equivariance would give
    error = (out_perm - expected).abs().max()
    assert error > 1e-4  # not exactly equivariant ...
    unrelated = (out_perm - out[[1, 2, 0]]).abs().max()
    assert error < unrelated  # ... but far closer than another network's output


def test_messages_follow_the_connections():
    """With neuron messages, moving hidden rows without their outgoing weights is a different network."""
    _, layout, model, tokens, _ = _setup(neuron_messages=True)
    index = token_permutation(layout, [torch.randperm(12), torch.arange(8)])
    with torch.no_grad():
        out = model(tokens, *_times(3), layout)
        out_perm = model(tokens[:, index], *_times(3), layout)
    assert not torch.allclose(out_perm, out[:, index], atol=1e-4)


def test_same_generator_runs_on_unseen_widths_and_depths():
    _, _, model, _, _ = _setup()
    for hidden in ([20], [6, 6, 6]):
        _, layout = target_layout({**TARGET, "hidden": hidden}, (1, 8, 8), 10, 16)
        out = model(torch.randn(2, layout.num_tokens, 16) * layout.mask, *_times(2), layout)
        assert out.shape == (2, layout.num_tokens, 16) and torch.isfinite(out).all()


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
