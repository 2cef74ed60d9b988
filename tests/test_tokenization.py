"""Tokenizer: exact round trip for every target, batch support, and how permutations act on tokens."""

from __future__ import annotations

import pytest
import torch

from synthnet.errors import SynthNetError
from synthnet.targets import TARGETS, build_target, permute_hidden, random_permutations
from synthnet.tokenization import build_layout, detokenize, token_permutation, tokenize

CASES = {
    "mlp": ({"name": "mlp", "hidden": [16, 8], "activation": "relu"}, (1, 8, 8), 10),
    "cnn": ({"name": "cnn", "channels": [4, 6], "kernel_size": 3, "pool": 2, "fc": [12]}, (1, 8, 8), 10),
    "poc_cnn": ({"name": "poc_cnn"}, (1, 28, 28), 10),
}


def test_every_target_has_a_case():
    assert set(CASES) == set(TARGETS)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("chunk_size", [7, 64])
@pytest.mark.parametrize("bias_chunk", [False, True])
def test_round_trip_is_exact(name, chunk_size, bias_chunk):
    config, input_shape, classes = CASES[name]
    torch.manual_seed(0)
    model = build_target(config, input_shape, classes)
    state = {k: v.detach() * 3.7 + 0.01 for k, v in model.state_dict().items()}  # not a power-of-two scale
    layout = build_layout(model.layer_specs(), state, chunk_size, bias_chunk=bias_chunk)
    tokens = tokenize(state, layout)
    assert tokens.shape == (layout.num_tokens, chunk_size)
    assert layout.num_values == sum(v.numel() for v in state.values())
    assert torch.all(tokens[~layout.mask] == 0)
    back = detokenize(tokens, layout)
    assert set(back) == set(state)
    for key in state:
        assert torch.equal(back[key], state[key]), key
    model.load_state_dict(back, strict=True)


def test_batched_round_trip_and_1d_cnn():
    model = build_target({"name": "cnn", "channels": [3], "kernel_size": 5, "fc": []}, (1, 40), 10)
    layout = build_layout(model.layer_specs(), model.state_dict(), 16)
    batch = {k: torch.randn(5, *v.shape) for k, v in model.state_dict().items()}
    tokens = tokenize(batch, layout)
    assert tokens.shape == (5, layout.num_tokens, 16)
    back = detokenize(tokens, layout)
    assert all(torch.equal(back[k], batch[k]) for k in batch)


def test_wrong_shapes_are_reported():
    model = build_target(CASES["mlp"][0], (1, 8, 8), 10)
    layout = build_layout(model.layer_specs(), model.state_dict(), 64)
    with pytest.raises(SynthNetError, match="shape"):
        tokenize({**model.state_dict(), "layers.0.weight": torch.zeros(3, 3)}, layout)
    with pytest.raises(SynthNetError, match="do not fit"):
        detokenize(torch.zeros(3, 64), layout)


def test_hidden_permutation_moves_rows_of_layer_l_and_values_inside_layer_l_plus_1():
    model = build_target({"name": "mlp", "hidden": [8], "activation": "relu"}, (1, 8, 8), 10)
    state = model.state_dict()
    layout = build_layout(model.layer_specs(), state, 64)
    perms = random_permutations(model.layer_specs(), state, torch.Generator().manual_seed(1))
    tokens = tokenize(state, layout)
    permuted = tokenize(permute_hidden(state, model.layer_specs(), perms), layout)
    index = token_permutation(layout, perms)
    first = layout.layers[0]
    hidden = slice(first.first_token, first.first_token + first.num_tokens)
    assert torch.equal(permuted[hidden], tokens[index][hidden])  # whole rows move
    readout = slice(layout.layers[1].first_token, layout.num_tokens)
    assert not torch.equal(permuted[readout], tokens[readout])  # same tokens, values moved inside
    assert torch.equal(permuted[readout][:, :8], tokens[readout][:, :8][:, perms[0]])


def test_a_bias_chunk_keeps_the_bias_slot_when_the_fan_in_changes():
    """Packed rows put the bias right after the weights, so a layer whose fan-in changes by one unit moves its
    bias to another position of its last chunk (what broke width transfer on MNIST-1D: README, Limits). With
    ``bias_chunk`` the bias is always the first value of its row's last token, alone there."""
    def layouts(first_width, bias_chunk):
        model = build_target({"name": "mlp", "hidden": [first_width, 100]}, (1, 40), 10)
        layout = build_layout(model.layer_specs(), model.state_dict(), 64, bias_chunk=bias_chunk)
        return model, layout

    for bias_chunk in (False, True):
        slots = set()
        for width in (96, 99, 100, 101):
            model, layout = layouts(width, bias_chunk)
            hidden = layout.layers[1]  # the hidden-to-hidden layer: fan-in = the first width
            last = hidden.first_token + hidden.chunks_per_row - 1  # unit 0's last token
            state = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
            state["layers.1.bias"] = torch.ones(100)
            tokens = tokenize(state, layout)
            slots.add(int(tokens[last].nonzero()[0, 0]))
            if bias_chunk:
                assert int(layout.mask[last].sum()) == 1
            permuted = permute_hidden(model.state_dict(), model.layer_specs(),
                                      random_permutations(model.layer_specs(), model.state_dict(),
                                                          torch.Generator().manual_seed(width)))
            back = detokenize(tokenize(permuted, layout), layout)
            assert all(torch.equal(back[k], permuted[k]) for k in permuted)
        assert (slots == {0}) if bias_chunk else (len(slots) == 4)
