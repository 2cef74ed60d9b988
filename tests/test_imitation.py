"""Imitation training: pairs, augmentation, loss, a step that helps, overfitting a tiny zoo, resume."""

from __future__ import annotations

import pytest
import torch

from synthnet.generation import target_layout
from synthnet.generators import build_generator
from synthnet.methods.data import load_zoo_tokens, split_runs
from synthnet.methods.imitation import (EMA, ImitationSettings, apply_index, imitation_loss, layer_mse,
                                        layer_value_weights, make_batch, permutation_index, sample_pairs,
                                        train_imitation)
from synthnet.targets import permute_hidden, random_permutations
from synthnet.tokenization import detokenize, tokenize


@pytest.fixture(scope="module")
def zoo(tiny_zoo, digits_task):
    template, layout = target_layout(tiny_zoo["target"], digits_task.input_shape, digits_task.num_classes, 32)
    return load_zoo_tokens(tiny_zoo["checkpoints_dir"], layout, template.layer_specs(), template.state_dict(),
                           target_config=tiny_zoo["target"])


def test_zoo_loads_as_tokens_with_times(zoo):
    assert zoo.tokens.shape[:2] == (3, 4) and zoo.seeds == [0, 1, 2]
    assert torch.allclose(zoo.times[0], torch.tensor([0.0, 1 / 3, 2 / 3, 1.0]))
    assert split_runs(3, 1) == ([0, 1], [2]) and split_runs(1, 4) == ([0], [])


def test_missing_zoo_says_where_and_how(tmp_path, zoo):
    from synthnet.errors import SynthNetError
    with pytest.raises(SynthNetError, match=f"no zoo in {tmp_path}.*synthnet zoo"):
        load_zoo_tokens(tmp_path, zoo.layout, zoo.specs, {})


def test_pair_sampling():
    times = torch.linspace(0, 1, 6).expand(4, -1)
    g = torch.Generator().manual_seed(0)
    run, i1, i2 = sample_pairs(times, 500, g)
    assert (i1 < i2).all() and run.max() == 3 and (i1 == 0).any() and (i2 - i1 > 1).any()
    _, i1, i2 = sample_pairs(times, 200, g, gap="adjacent")
    assert (i2 == i1 + 1).all()
    _, i1, i2 = sample_pairs(times, 200, g, max_gap=0.4)
    assert ((times[0, i2] - times[0, i1]) <= 0.4 + 1e-6).all()
    _, i1, _ = sample_pairs(times, 50, g, from_init_fraction=1.0)
    assert (i1 == 0).all()


def test_permutation_augmentation_is_the_targets_permutation_on_both_sides(zoo, digits_task):
    g = torch.Generator().manual_seed(0)
    reference = detokenize(zoo.tokens[0, -1], zoo.layout)
    perms = random_permutations(zoo.specs, reference, g)
    index = permutation_index(zoo.layout, zoo.specs, perms)
    pair = zoo.tokens[0, [0, -1]]  # (2, N, C): init and final of one run
    moved = apply_index(pair, index.expand(2, -1))
    for k in range(2):
        expected = tokenize(permute_hidden(detokenize(pair[k], zoo.layout), zoo.specs, perms), zoo.layout)
        assert torch.equal(moved[k], expected)
    template, _ = target_layout(zoo.target_config, digits_task.input_shape, digits_task.num_classes, 32)
    x = digits_task.x_test[:50]
    template.load_state_dict(reference)
    before = template(x)
    template.load_state_dict(detokenize(moved[1], zoo.layout))
    assert torch.allclose(template(x), before, atol=1e-5)  # the same function


def test_layer_normalised_mse_weighs_layers_equally(zoo):
    weights = layer_value_weights(zoo.layout)
    assert torch.isclose(weights.sum(), torch.tensor(1.0))
    first = zoo.layout.layers[0]
    target = torch.zeros(1, *zoo.layout.mask.shape)
    error_first = torch.zeros_like(target)
    error_first[0, first.first_token:first.first_token + first.num_tokens] = 1.0
    error_last = torch.zeros_like(target)
    error_last[0, first.num_tokens:] = 1.0
    assert torch.isclose(layer_mse(error_first * zoo.layout.mask, target, weights),
                         layer_mse(error_last * zoo.layout.mask, target, weights))


@pytest.mark.parametrize("name", ["perceiver_moe", "flat_mlp"])
def test_one_step_lowers_the_loss_on_a_held_out_run(zoo, name):
    """One AdamW step on pairs of runs 0 and 1 lowers the loss on pairs of run 2, which it never saw."""
    torch.manual_seed(0)
    options = {"d_model": 32, "num_latents": 8, "num_blocks": 1} if name == "perceiver_moe" else {"hidden": 64}
    model = build_generator({"name": name, **options}, zoo.layout)
    settings = ImitationSettings(batch_size=16, noise_std=0.05, permute=True)
    batch = make_batch(zoo.select([0, 1]), settings, torch.Generator().manual_seed(1), torch.device("cpu"))
    held_out = make_batch(zoo.select([2]), settings, torch.Generator().manual_seed(2), torch.device("cpu"))
    weights = layer_value_weights(zoo.layout)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss, mse = imitation_loss(model, batch, zoo.layout, weights)
    assert torch.isfinite(loss) and loss >= mse
    with torch.no_grad():
        before, _ = imitation_loss(model, held_out, zoo.layout, weights)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        after, _ = imitation_loss(model, held_out, zoo.layout, weights)
    assert after < before


@pytest.mark.parametrize("name", ["perceiver_moe", "flat_mlp"])
def test_training_overfits_two_runs_and_validates_on_a_third(zoo, name):
    """Trained on runs 0 and 1, the generator reproduces their pairs closely; the validation loss it
    reports is the held-out run 2's, which it fits less well."""
    from synthnet.methods.imitation import validation_loss

    torch.manual_seed(0)
    data, held_out = zoo.select([0, 1]), zoo.select([2])
    options = ({"d_model": 32, "num_latents": 8, "num_blocks": 1, "num_experts": 2, "top_k": 1}
               if name == "perceiver_moe" else {"hidden": 128})
    model = build_generator({"name": name, **options}, data.layout)
    settings = ImitationSettings(steps=120, batch_size=12, lr=3e-3, warmup_steps=5, permute=False, noise_std=0.0,
                                 ema_decay=0.0, log_every=120, eval_every=120, save_every=120,
                                 consistency_weight=0.1)
    weights = layer_value_weights(data.layout)
    start = torch.stack([layer_mse(data.tokens[r, 0:1], data.tokens[r, -1:], weights) for r in range(2)]).mean()
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
    ema = EMA(model, settings.ema_decay)
    metrics = train_imitation(model, optimizer, data, settings, ema=ema, val_data=held_out)
    fit = validation_loss(ema.model, data, data.layout, weights, torch.device("cpu"))
    # every (t1 < t2) pair of the training runs, init -> final included, is reproduced closely
    assert fit["val_loss"] < 0.2 * float(start) and fit["val_loss_init_to_final"] < 0.3 * float(start)
    again = validation_loss(ema.model, held_out, data.layout, weights, torch.device("cpu"))
    assert metrics["val_loss"] == pytest.approx(again["val_loss"])  # what it reports is run 2's loss
    assert metrics["val_loss"] > 1.5 * fit["val_loss"]  # and run 2 is not fitted like the training runs


def test_learning_rate_warms_up_then_decays_to_its_floor():
    from synthnet.methods.imitation import lr_factor

    factors = [lr_factor(step, 100, 10, 0.1) for step in range(100)]
    assert factors[:10] == pytest.approx([(k + 1) / 10 for k in range(10)])  # linear warm-up to 1
    assert factors[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))  # then never rises
    assert lr_factor(55, 100, 10, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert lr_factor(100, 100, 10, 0.1) == pytest.approx(0.1) and lr_factor(500, 100, 10, 0.1) == pytest.approx(0.1)
    assert lr_factor(0, 100, 0, 0.0) == pytest.approx(1.0)  # no warm-up


def test_ema_tracks_the_parameters_and_copies_the_buffers():
    model = torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = EMA(model, 0.75)
    with torch.no_grad():
        model.weight.fill_(5.0)
        model.running_mean.fill_(2.0)
    ema.update(model)
    assert torch.allclose(ema.model.weight, torch.full((3,), 0.75 * 1.0 + 0.25 * 5.0))  # decay x old + (1 - decay) x new
    assert torch.equal(ema.model.running_mean, model.running_mean)
    assert not ema.model.weight.requires_grad and not ema.model.training
    ema.update(model)
    assert torch.allclose(ema.model.weight, torch.full((3,), 0.75 * 2.0 + 0.25 * 5.0))
    follower = EMA(model, 0.0)
    with torch.no_grad():
        model.weight.fill_(-1.0)
    follower.update(model)
    assert torch.equal(follower.model.weight, model.weight)  # decay 0: the model itself


def test_consistency_loss_auxiliary_term_comes_from_the_forwards_with_gradients(zoo):
    """``consistency_loss`` = per-layer MSE(two steps, one step) + the mean MoE auxiliary loss of the two
    forwards that carry gradients (not of the no_grad target forward)."""
    from synthnet.methods.imitation import consistency_loss, sample_triplets

    torch.manual_seed(0)
    model = build_generator({"name": "perceiver_moe", "d_model": 32, "num_latents": 8, "num_blocks": 1,
                             "num_experts": 4, "top_k": 1}, zoo.layout)
    with torch.no_grad():  # leave the identity-at-init state so the three forwards differ
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    weights = layer_value_weights(zoo.layout)
    loss = consistency_loss(model, zoo, 6, torch.Generator().manual_seed(3), zoo.layout, weights, torch.device("cpu"))
    run, i1, i2, i3 = sample_triplets(zoo.times, 6, torch.Generator().manual_seed(3))
    source = zoo.tokens[run, i1]
    t1, t2, t3 = (zoo.times[run, i] for i in (i1, i2, i3))
    first = model(source, t1, t2, zoo.layout)
    aux_first = model.auxiliary_loss()
    two = model(first, t2, t3, zoo.layout)
    aux_two = model.auxiliary_loss()
    with torch.no_grad():
        one = model(source, t1, t3, zoo.layout)
    aux_target = model.auxiliary_loss()
    mse = layer_mse(two, one, weights)
    assert torch.allclose(loss, mse + (aux_first + aux_two) / 2, atol=1e-6)
    assert not torch.allclose(aux_target, (aux_first + aux_two) / 2)  # the test tells them apart
    assert loss.requires_grad


def test_backward_in_slices_gives_the_whole_batchs_gradient(zoo):
    """Gradient accumulation over slices of ``slice_tokens`` equals one backward of the whole batch (the MoE
    balance term off: its statistics are per slice), and the returned loss and MSE are the whole batch's."""
    from synthnet.methods.imitation import backward_in_slices

    torch.manual_seed(0)
    model = build_generator({"name": "perceiver_moe", "d_model": 32, "num_latents": 8, "num_blocks": 1,
                             "balance_loss_weight": 0.0, "z_loss_weight": 0.0}, zoo.layout)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = make_batch(zoo, ImitationSettings(batch_size=7), torch.Generator().manual_seed(1), torch.device("cpu"))
    weights = layer_value_weights(zoo.layout)
    whole, whole_mse = imitation_loss(model, batch, zoo.layout, weights)
    whole.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    tokens = batch.source.shape[1]
    for slice_tokens in (tokens, 3 * tokens, 10 * tokens):  # slices of 1, 3 (3 + 3 + 1) and the whole batch
        model.zero_grad(set_to_none=True)
        loss, mse = backward_in_slices(model, batch, zoo.layout, weights, slice_tokens, step=0)
        assert torch.allclose(loss, whole.detach(), rtol=1e-5) and torch.allclose(mse, whole_mse.detach(), rtol=1e-5)
        for got, want in zip((p.grad for p in model.parameters()), expected):
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-7)
    with torch.no_grad():
        model.parameters().__next__().fill_(float("nan"))
    with pytest.raises(Exception, match="not finite at step 3"):
        backward_in_slices(model, batch, zoo.layout, weights, tokens, step=2)
