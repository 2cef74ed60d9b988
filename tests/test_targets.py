"""Targets: build on every compatible task, refuse incompatible ones, permute without changing the function."""

from __future__ import annotations

import pytest
import torch

from synthnet.errors import SynthNetError
from synthnet.targets import (build_target, init_state_dict, num_parameters, permute_hidden,
                              random_permutations)

SHAPES = {"digits": (1, 8, 8), "mnist1d": (1, 40), "mnist": (1, 28, 28)}
TARGETS = {
    "mlp": {"name": "mlp", "hidden": [32, 16], "activation": "relu"},
    "cnn": {"name": "cnn", "channels": [8, 16], "kernel_size": 3, "pool": 2, "fc": [32]},
    "poc_cnn": {"name": "poc_cnn"},
}
COMPATIBLE = [(t, s) for t in ("mlp", "cnn") for s in SHAPES] + [("poc_cnn", "mnist")]


@pytest.mark.parametrize("target,task", COMPATIBLE)
def test_every_target_builds_on_every_compatible_task(target, task):
    model = build_target(TARGETS[target], SHAPES[task], 10)
    out = model(torch.randn(3, *SHAPES[task]))
    assert out.shape == (3, 10)
    specs = model.layer_specs()
    assert {s.weight for s in specs} | {s.bias for s in specs} == set(model.state_dict())


def test_poc_cnn_has_exactly_421642_parameters():
    assert num_parameters(build_target({"name": "poc_cnn"}, (1, 28, 28), 10)) == 421_642


@pytest.mark.parametrize("target,task,message", [
    ("poc_cnn", "digits", "poc_cnn needs 1x28x28"),
    ("poc_cnn", "mnist1d", "poc_cnn needs 1x28x28"),
])
def test_incompatible_pairs_are_refused(target, task, message):
    with pytest.raises(SynthNetError, match=message):
        build_target(TARGETS[target], SHAPES[task], 10)


def test_cnn_rank_mismatch_is_refused():
    with pytest.raises(SynthNetError, match="dims=2 cannot run on a 1-D task"):
        build_target({"name": "cnn", "channels": [4], "dims": 2}, (1, 40), 10)


def test_unknown_target_lists_available():
    with pytest.raises(SynthNetError, match="available: cnn, mlp, poc_cnn"):
        build_target({"name": "resnet"}, (1, 8, 8), 10)


@pytest.mark.parametrize("target,task", COMPATIBLE)
def test_permute_hidden_preserves_function_and_changes_weights(target, task):
    model = build_target(TARGETS[target], SHAPES[task], 10)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, *SHAPES[task])
    before = model(x)
    perms = random_permutations(model.layer_specs(), state, torch.Generator().manual_seed(0))
    permuted = permute_hidden(state, model.layer_specs(), perms)
    assert any(not torch.equal(permuted[k], state[k]) for k in state)
    model.load_state_dict(permuted)
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


def test_init_is_seeded_and_leaves_global_rng_alone():
    cfg = TARGETS["mlp"]
    torch.manual_seed(7)
    expected = torch.rand(1)
    torch.manual_seed(7)
    a = init_state_dict(cfg, (1, 8, 8), 10, seed=3)
    assert torch.equal(torch.rand(1), expected)
    b = init_state_dict(cfg, (1, 8, 8), 10, seed=3)
    c = init_state_dict(cfg, (1, 8, 8), 10, seed=4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["layers.0.weight"], c["layers.0.weight"])
