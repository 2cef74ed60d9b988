"""GRPO and evolution strategies: advantages, clipped objective, exact KL, centred ranks, a toy reward
with a known optimum for both, pruning rewards and real iterations through the CLI on a tiny digits zoo."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from synthnet.errors import SynthNetError
from synthnet.methods.grpo import (GRPOSettings, clipped_surrogate, group_advantages, policy_kl, rollout, tied_groups,
                                   train)
from synthnet.methods.rewards import REWARDS, Reward, accuracy_and_loss_loop, magnitude_prune
from synthnet.sampling import gaussian_kl, sample, step_log_probs
from synthnet.targets import MLP
from synthnet.tokenization import build_layout, detokenize, tokenize


class ShiftDenoiser(nn.Module):
    """Stand-in policy: moves every token by a learned offset scaled by the time step."""

    def __init__(self, num_tokens: int, chunk: int):
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(num_tokens, chunk))

    def forward(self, tokens, t_source, t_target, layout):  # (B, N, C), (B,), (B,) -> (B, N, C)
        return tokens + (t_target - t_source)[:, None, None] * self.shift

    def auxiliary_loss(self):
        return self.shift.new_zeros(())


@pytest.fixture()
def toy_layout():
    model = MLP(input_shape=(4,), num_classes=3, hidden=[5])
    return build_layout(model.layer_specs(), model.state_dict(), chunk_size=4)


def test_group_advantages_normalise_and_zero_std():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.7, 0.7, 0.7, 0.7], [0.1, 0.1, 0.1, 0.3]])
    adv = group_advantages(rewards, eps=1e-6)
    first = (rewards[0] - 2.5) / (math.sqrt(1.25) + 1e-6)
    assert torch.allclose(adv[0], first)
    assert torch.equal(adv[1], torch.zeros(4))  # all tie: exactly zero, no NaN
    assert torch.allclose(adv[2].mean(), torch.tensor(0.0), atol=1e-6)
    assert adv[2, 3] > 0 and (adv[2, :3] < 0).all()
    assert torch.allclose(adv[0].std(unbiased=False), torch.tensor(1.0), atol=1e-4)
    assert tied_groups(rewards).tolist() == [False, True, False]
    # ties that are not bit-identical after a mean are still exactly zero
    assert torch.equal(group_advantages(torch.full((1, 3), 0.1)), torch.zeros(1, 3))


def test_clipped_surrogate_matches_hand_computation():
    ratios = torch.tensor([1.5, 0.5, 1.1, 0.5])
    advantages = torch.tensor([1.0, -1.0, 2.0, 1.0])
    new = ratios.log().requires_grad_(True)
    loss, clip_fraction = clipped_surrogate(new, torch.zeros(4), advantages, clip_epsilon=0.2)
    # per element max(-A r, -A clip(r)): -1.2 (clipped), 0.8 (clipped), -2.2, -0.5 (pessimistic, unclipped)
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 2.2 - 0.5) / 4, abs=1e-6)
    assert clip_fraction.item() == pytest.approx(0.75)
    loss.backward()
    # d/d logp of -A r / 4 is -A r / 4 where the unclipped term is active, 0 where clipped
    assert torch.allclose(new.grad, torch.tensor([0.0, 0.0, -2.2 / 4, -0.5 / 4]), atol=1e-6)


def test_clipped_surrogate_per_step_broadcasts_advantages():
    new = torch.zeros(2, 3)
    loss, clip_fraction = clipped_surrogate(new, torch.zeros(2, 3), torch.tensor([1.0, -3.0]), 0.2)
    assert loss.item() == pytest.approx(1.0)  # mean of -A over candidates and steps
    assert clip_fraction.item() == 0.0


def test_gaussian_kl_and_log_prob_match_closed_form(toy_layout):
    torch.manual_seed(0)
    shape = (3, toy_layout.num_tokens, toy_layout.chunk_size)
    mask = toy_layout.mask
    mean_p, mean_q, x = torch.randn(shape), torch.randn(shape), torch.randn(shape)
    std = 0.3
    p, q = torch.distributions.Normal(mean_p, std), torch.distributions.Normal(mean_q, std)
    reference = (torch.distributions.kl_divergence(p, q) * mask).sum((1, 2)) / mask.sum()
    assert torch.allclose(gaussian_kl(mean_p, mean_q, std, mask), reference, atol=1e-6)
    # closed form for equal variances
    closed = (((mean_p - mean_q) ** 2 / (2 * std ** 2)) * mask).sum((1, 2)) / mask.sum()
    assert torch.allclose(gaussian_kl(mean_p, mean_q, std, mask), closed, atol=1e-6)
    assert torch.equal(gaussian_kl(mean_p, mean_p, std, mask), torch.zeros(3))
    # policy_kl averages the noisy steps only
    kl = policy_kl([mean_p, mean_p], [mean_q, mean_p * 5], [std, 0.0], mask)
    assert torch.allclose(kl, reference, atol=1e-6)


def test_rollout_log_probs_are_exact_and_recomputed(toy_layout):
    torch.manual_seed(0)
    policy = ShiftDenoiser(toy_layout.num_tokens, toy_layout.chunk_size)
    with torch.no_grad():
        policy.shift.normal_()
    inits = torch.randn(2, toy_layout.num_tokens, toy_layout.chunk_size) * toy_layout.mask
    batch = rollout(policy, inits, toy_layout, group_size=3, steps=2, noise_scale=[0.1, 0.2],
                    generator=torch.Generator().manual_seed(1))
    assert batch.log_probs.shape == (6, 2)
    assert torch.equal(batch.trajectory[0][0], batch.trajectory[0][2])  # a group shares its init
    assert not torch.equal(batch.final[0], batch.final[1])  # but not its candidates
    mask = toy_layout.mask
    for k, std in enumerate([0.1, 0.2]):
        mean = batch.trajectory[k] + 0.5 * policy.shift.detach() * mask
        direct = (torch.distributions.Normal(mean, std).log_prob(batch.trajectory[k + 1]) * mask).sum((1, 2)) / mask.sum()
        assert torch.allclose(batch.log_probs[:, k], direct, atol=1e-5)
    recomputed, _ = step_log_probs(policy, batch.trajectory, toy_layout, batch.times, [0.1, 0.2])
    assert torch.allclose(recomputed, batch.log_probs, atol=1e-5)


def _toy_run(toy_layout, beta: float, iterations: int = 12, minibatch_size: int = 0, policy=None):
    torch.manual_seed(0)
    tokens, chunk = toy_layout.num_tokens, toy_layout.chunk_size
    mask = toy_layout.mask.float()
    target = torch.randn(tokens, chunk) * mask
    policy = policy or ShiftDenoiser(tokens, chunk)
    reference = ShiftDenoiser(tokens, chunk)
    optimizer = torch.optim.Adam(policy.parameters(), lr=0.1)
    settings = GRPOSettings(inits_per_iteration=2, group_size=8, steps=2, noise_scale=0.3, inner_epochs=2, beta=beta,
                            minibatch_size=minibatch_size)

    def reward_fn(final):  # minus the distance of the generated weights to a fixed vector
        return -(((final - target) * mask) ** 2).sum((1, 2))

    def make_inits(iteration):
        return torch.zeros(2, tokens, chunk)

    def distance():
        with torch.no_grad():
            out = sample(policy, torch.zeros(1, tokens, chunk), toy_layout, 2).final  # deterministic mode
        return float(((out[0] - target) * mask).norm())

    before = distance()
    history = train(policy, reference, optimizer, layout=toy_layout, make_inits=make_inits, reward_fn=reward_fn,
                    settings=settings, iterations=iterations, progress=False)
    return before, distance(), history


def test_grpo_moves_deterministic_output_toward_known_optimum(toy_layout):
    before, after, history = _toy_run(toy_layout, beta=0.0)
    assert after < 0.75 * before
    assert history[-1]["reward_mean"] > history[0]["reward_mean"]
    for key in ("reward_mean", "reward_max", "reward_std", "tie_fraction", "kl", "clip_fraction", "seconds"):
        assert math.isfinite(history[-1][key])
    assert history[-1]["kl"] > 0  # the policy left the frozen reference


def test_minibatches_split_each_epoch_over_all_candidates(toy_layout):
    """minibatch_size=4 with 16 candidates and 2 inner epochs: 8 gradient steps of 4 candidates, each
    epoch seeing every candidate once; the policy still climbs the reward."""

    class Spy(ShiftDenoiser):
        def __init__(self, *args):
            super().__init__(*args)
            self.seen = []

        def forward(self, tokens, t_source, t_target, layout):
            if torch.is_grad_enabled():  # the update's recomputation, not the rollout
                self.seen.append(tokens.detach().clone())
            return super().forward(tokens, t_source, t_target, layout)

    spy = Spy(toy_layout.num_tokens, toy_layout.chunk_size)
    before, after, _ = _toy_run(toy_layout, beta=0.0, iterations=6, minibatch_size=4, policy=spy)
    assert after < 0.85 * before
    steps = 2  # generation steps: one policy call each per minibatch
    first_iteration = spy.seen[:8 * steps]
    assert [len(x) for x in first_iteration] == [4] * (8 * steps)
    noisy = first_iteration[1::steps]  # each minibatch's states after the first (noisy) step: one per candidate
    epochs = [torch.cat(noisy[:4]).flatten(1), torch.cat(noisy[4:]).flatten(1)]
    for rows in epochs:  # each epoch: the 16 candidates, each once
        assert len(torch.unique(rows, dim=0)) == 16
    assert torch.equal(torch.unique(epochs[0], dim=0), torch.unique(epochs[1], dim=0))
    assert not torch.equal(epochs[0], epochs[1])  # in another order
    full = Spy(toy_layout.num_tokens, toy_layout.chunk_size)
    _toy_run(toy_layout, beta=0.0, iterations=1, minibatch_size=0, policy=full)
    assert [len(x) for x in full.seen] == [16] * (2 * steps)  # 0 = all candidates in one step per epoch


def test_kl_penalty_holds_policy_near_reference(toy_layout):
    _, free, free_history = _toy_run(toy_layout, beta=0.0, iterations=6)
    _, held, held_history = _toy_run(toy_layout, beta=50.0, iterations=6)
    assert held_history[-1]["kl"] < free_history[-1]["kl"]
    assert held > free


def test_magnitude_prune_exact_fraction_per_network():
    torch.manual_seed(0)
    stacked = {"w": torch.randn(3, 4, 5), "b": torch.randn(3, 4)}
    pruned = magnitude_prune(stacked, 0.5, batch_dims=1)
    assert torch.equal(pruned["b"], stacked["b"])  # biases are kept
    for i in range(3):
        kept = pruned["w"][i] != 0
        assert int(kept.sum()) == 10
        assert stacked["w"][i][kept].abs().min() >= stacked["w"][i][~kept].abs().max()
    single = magnitude_prune({"w": stacked["w"][1], "b": stacked["b"][1]}, 0.5)
    assert torch.equal(single["w"], pruned["w"][1])
    global_pruned = magnitude_prune({"a": torch.tensor([[1.0, -4.0]]), "c": torch.tensor([[3.0, 0.5]])}, 0.5,
                                    scope="global")
    assert global_pruned["a"].tolist() == [[0.0, -4.0]] and global_pruned["c"].tolist() == [[3.0, 0.0]]


def test_quantize_rounds_each_output_channel_to_its_own_grid():
    """Symmetric round to nearest with one scale per output channel: every weight is an integer in
    [-q_max, q_max] times its channel's scale, the error is at most half a step, zeros stay zeros, biases
    and zero channels are kept, and stacked networks are quantized one by one."""
    from synthnet.methods.rewards import quantize

    torch.manual_seed(0)
    stacked = {"w": torch.randn(3, 6, 2, 5), "b": torch.randn(3, 6)}
    stacked["w"][1, 2] = 0.0  # a dead channel
    pruned = magnitude_prune(stacked, 0.6, batch_dims=1)
    for bits in (8, 4, 2):
        q_max = 2 ** (bits - 1) - 1
        out = quantize(pruned, bits, batch_dims=1)
        assert torch.equal(out["b"], stacked["b"])
        scale = pruned["w"].abs().amax(dim=(2, 3), keepdim=True) / q_max
        steps = torch.where(scale > 0, out["w"] / torch.where(scale > 0, scale, 1), 0)
        assert torch.allclose(steps, steps.round(), atol=1e-4) and steps.abs().max() <= q_max + 1e-4
        assert ((out["w"] - pruned["w"]).abs() <= scale / 2 + 1e-6).all()
        assert torch.equal(out["w"][pruned["w"] == 0], torch.zeros(int((pruned["w"] == 0).sum())))
        assert torch.equal(out["w"][1, 2], torch.zeros(2, 5))
        for i in range(3):
            for channel in range(6):
                assert len(out["w"][i, channel].unique()) <= 2 * q_max + 1
        assert torch.equal(quantize({"w": pruned["w"][0]}, bits)["w"], out["w"][0])
    assert (quantize(stacked, 16, batch_dims=1)["w"] - stacked["w"]).abs().max() < 1e-3
    with pytest.raises(SynthNetError, match="bits must be 2..16"):
        quantize(stacked, 1)


def test_rewards_batched_equals_loop(digits_task):
    model = MLP(input_shape=digits_task.input_shape, num_classes=10, hidden=[8])
    nets = []
    for seed in range(4):
        torch.manual_seed(seed)
        nets.append({k: v.detach().clone() for k, v in MLP(input_shape=digits_task.input_shape, num_classes=10,
                                                             hidden=[8]).state_dict().items()})
    stacked = {k: torch.stack([n[k] for n in nets]) for k in nets[0]}
    for name in REWARDS:
        settings = {"pruned_val_accuracy": {"prune_fraction": 0.3}, "quantized_val_accuracy": {"bits": 3}}.get(name, {})
        batched = Reward(name, model, digits_task.x_val, digits_task.y_val, settings)(stacked)
        looped = Reward(name, model, digits_task.x_val, digits_task.y_val, settings, scoring="loop")(stacked)
        assert batched.shape == (4,)
        assert torch.allclose(batched, looped, atol=1e-5)
    with pytest.raises(SynthNetError, match="unknown option reward.prune_fraction"):  # an option of another reward
        Reward("val_accuracy", model, digits_task.x_val, digits_task.y_val, {"prune_fraction": 0.3})
    accuracy, _ = accuracy_and_loss_loop(model, stacked, digits_task.x_val, digits_task.y_val)
    assert torch.allclose(Reward("val_accuracy", model, digits_task.x_val, digits_task.y_val)(stacked), accuracy)
    # pruning everything leaves bias-only networks: every input gets the same class
    fully = Reward("pruned_val_accuracy", model, digits_task.x_val, digits_task.y_val, {"prune_fraction": 1.0})
    assert (fully(stacked) < 0.2).all()
    two_bit = Reward("quantized_val_accuracy", model, digits_task.x_val, digits_task.y_val, {"bits": 2})(stacked)
    eight_bit = Reward("quantized_val_accuracy", model, digits_task.x_val, digits_task.y_val, {"bits": 8})(stacked)
    assert torch.allclose(eight_bit, accuracy, atol=0.02) and not torch.equal(two_bit, accuracy)


def test_rewards_on_tokens_roundtrip(digits_task):
    model = MLP(input_shape=digits_task.input_shape, num_classes=10, hidden=[8])
    layout = build_layout(model.layer_specs(), model.state_dict(), chunk_size=16)
    tokens = tokenize({k: v[None] for k, v in model.state_dict().items()}, layout)
    reward = Reward("val_accuracy", model, digits_task.x_val, digits_task.y_val)
    value = reward(detokenize(tokens, layout))
    assert value.shape == (1,) and reward.evaluations == 1


def _grpo_config(root, *overrides, algorithm="grpo"):
    from synthnet.cli import compose

    return compose([f"paths.root={root}", "target.hidden=[16]", "method=grpo", f"method.algorithm={algorithm}",
                    "generator=perceiver_moe",
                    "++generator.d_model=32", "++generator.num_latents=8", "++generator.num_blocks=1",
                    "++generator.time_dim=16", "++generator.message_rank=8", "method.inits_per_iteration=2",
                    "method.group_size=3", "generate.steps=2", "method.save_every=1", "progress=false",
                    *overrides])


def _write_imitation_stand_in(cfg, head_std: float = 0.0):
    """An (untrained) generator saved where the imitation stage writes its file; ``head_std > 0`` draws its
    output head (zero at init, so its networks would not depend on its conditioning)."""
    from synthnet.config import container
    from synthnet.commands.artifacts import imitation_path
    from synthnet.generation import target_layout
    from synthnet.generators import build_generator, save_generator

    torch.manual_seed(0)
    _, layout = target_layout(container(cfg.target), (1, 8, 8), 10, int(cfg.generator.chunk_size))
    model = build_generator(container(cfg.generator), layout)
    if head_std:
        torch.nn.init.normal_(model.head.weight, std=head_std)
    save_generator(imitation_path(cfg), model, config=container(cfg.generator), target_config=container(cfg.target),
                   task_config=container(cfg.task), chunk_size=layout.chunk_size)


def test_grpo_command_writes_resumable_generator(tmp_path):
    from synthnet.commands.artifacts import grpo_path, read_records
    from synthnet.commands.train_grpo import train_grpo
    from synthnet.generators import load_generator
    from synthnet.storage import load_state_dict, read_metadata

    straight = _grpo_config(tmp_path / "a", "method.iterations=2")
    _write_imitation_stand_in(straight)
    path = train_grpo(straight)
    assert path == grpo_path(straight) and path.name == "perceiver_moe-grpo.safetensors"
    header = read_metadata(path)
    assert header["method"] == "grpo" and header["reward"] == "val_accuracy" and header["grpo_iteration"] == 2
    assert header["imitation_source"] == "perceiver_moe-imitation.safetensors"
    loaded = load_generator(path)  # a normal generator file
    records = read_records(path.with_name("perceiver_moe-grpo.metrics.jsonl"))
    assert [r["iteration"] for r in records] == [1, 2]
    for key in ("reward_mean", "reward_max", "reward_std", "tie_fraction", "kl", "clip_fraction", "seconds",
                "evaluations_per_second"):
        assert math.isfinite(records[-1][key])
    assert (tmp_path / "a" / "digits-mlp" / "reports" / "perceiver_moe-grpo-reward.png").stat().st_size > 0

    # one iteration, then resume to two: the same weights as two iterations straight through
    first = _grpo_config(tmp_path / "b", "method.iterations=1")
    _write_imitation_stand_in(first)
    train_grpo(first)
    resumed = train_grpo(_grpo_config(tmp_path / "b", "method.iterations=2"))
    assert read_metadata(resumed)["grpo_iteration"] == 2
    a, _ = load_state_dict(path)
    b, _ = load_state_dict(resumed)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert len(read_records(resumed.with_name("perceiver_moe-grpo.metrics.jsonl"))) == 2
    assert sorted(p.name for p in resumed.parent.glob("*.safetensors")) == [  # resume state kept apart
        "perceiver_moe-grpo.safetensors", "perceiver_moe-imitation.safetensors"]
    assert loaded.metadata["grpo_settings"]["group_size"] == 3


def test_cli_trains_imitation_then_grpo_on_tiny_zoo(tmp_path, tiny_zoo, capsys):
    """`synthnet train method=grpo` with no imitation file: imitation first, then one GRPO iteration."""
    from synthnet.cli import main
    from synthnet.generators import load_generator
    from synthnet.storage import read_metadata

    root = tmp_path / "cli"
    overrides = [f"paths.root={root}", f"paths.checkpoints_dir={tiny_zoo['checkpoints_dir']}", "target.hidden=[16]",
                 "method=grpo", "++generator.d_model=32", "++generator.num_latents=8", "++generator.num_blocks=1",
                 "++generator.time_dim=16", "++generator.message_rank=8", "method.imitation.steps=2",
                 "method.imitation.val_runs=1", "method.imitation.batch_size=8", "method.imitation.log_every=1",
                 "method.imitation.eval_every=2", "method.imitation.save_every=2", "method.imitation.warmup_steps=1",
                 "method.iterations=1", "method.inits_per_iteration=2", "method.group_size=3", "generate.steps=2",
                 "reward=pruned_val_accuracy", "reward.prune_fraction=0.3", "progress=false"]
    assert main(["train", *overrides]) == 0
    generators = root / "digits-mlp" / "generators"
    imitation = generators / "perceiver_moe-imitation.safetensors"
    tuned = generators / "perceiver_moe-grpo-pruned_val_accuracy.safetensors"
    assert imitation.exists() and tuned.exists()
    header = read_metadata(tuned)
    assert header["method"] == "grpo" and header["reward"] == "pruned_val_accuracy"
    assert header["reward_config"]["prune_fraction"] == 0.3 and header["grpo_iteration"] == 1
    assert header["imitation_fingerprint"] == read_metadata(imitation)["fingerprint"]
    assert load_generator(tuned).config == load_generator(imitation).config
    assert "grpo:" in capsys.readouterr().out
    from synthnet.storage import load_state_dict
    start, _ = load_state_dict(imitation)
    once, _ = load_state_dict(tuned)
    assert any(not torch.equal(start[k], once[k]) for k in start)  # the iteration changed the generator
    # raising the iteration count resumes the same file
    assert main(["train", *overrides[:-1], "method.iterations=2", "progress=false"]) == 0
    assert read_metadata(tuned)["grpo_iteration"] == 2 and read_metadata(tuned)["finished"] is True
    twice, _ = load_state_dict(tuned)
    assert any(not torch.equal(once[k], twice[k]) for k in once)  # and the second one again


def test_grpo_reward_suffix_and_missing_imitation(tmp_path):
    from synthnet.commands.artifacts import grpo_path
    from synthnet.commands.train_grpo import train_grpo
    from synthnet.errors import SynthNetError

    cfg = _grpo_config(tmp_path, "reward=pruned_val_accuracy", "method.imitation_first=false", "method.iterations=1")
    assert grpo_path(cfg).name == "perceiver_moe-grpo-pruned_val_accuracy.safetensors"
    with pytest.raises(SynthNetError, match="synthnet train method=imitation"):
        train_grpo(cfg)


def test_interrupted_grpo_leaves_no_generator_file_and_resumes_exactly(tmp_path, monkeypatch):
    """Resume state in <generators>/resume/<name> like every method; the generator file appears once, finished."""
    import synthnet.methods.grpo as grpo_module
    from synthnet.commands.artifacts import resume_path
    from synthnet.commands.artifacts import grpo_path
    from synthnet.commands.train_grpo import train_grpo
    from synthnet.storage import load_state_dict, read_metadata

    straight = _grpo_config(tmp_path / "a", "method.iterations=2", "method.save_every=1")
    _write_imitation_stand_in(straight)
    finished = train_grpo(straight)

    cfg = _grpo_config(tmp_path / "b", "method.iterations=2", "method.save_every=1")
    _write_imitation_stand_in(cfg)
    real = grpo_module.train

    def interrupted(*args, on_iteration=None, **kwargs):
        def stop_after_one(iteration, stats):
            on_iteration(iteration, stats)
            raise KeyboardInterrupt
        return real(*args, on_iteration=stop_after_one, **kwargs)

    monkeypatch.setattr(grpo_module, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_grpo(cfg)
    path = grpo_path(cfg)
    assert not path.exists()  # nothing unfinished where evaluate looks
    assert read_metadata(resume_path(path))["grpo_iteration"] == 1
    monkeypatch.setattr(grpo_module, "train", real)
    resumed = train_grpo(cfg)
    assert read_metadata(resumed)["finished"] is True and read_metadata(resumed)["grpo_iteration"] == 2
    a, _ = load_state_dict(finished)
    b, _ = load_state_dict(resumed)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_grpo_with_other_settings_is_refused_not_continued(tmp_path):
    from synthnet.commands.artifacts import grpo_path
    from synthnet.commands.train_grpo import train_grpo
    from synthnet.errors import SynthNetError
    from synthnet.storage import read_metadata

    cfg = _grpo_config(tmp_path, "method.iterations=1")
    _write_imitation_stand_in(cfg)
    path = train_grpo(cfg)
    before = path.read_bytes()
    with pytest.raises(SynthNetError, match="other GRPO settings"):
        train_grpo(_grpo_config(tmp_path, "method.iterations=2", "method.lr=0.5"))
    assert path.read_bytes() == before
    assert read_metadata(train_grpo(_grpo_config(tmp_path, "method.iterations=2")))["grpo_iteration"] == 2
    again = train_grpo(_grpo_config(tmp_path, "method.iterations=1", "method.lr=0.5", "train.overwrite=true"))
    assert again == grpo_path(cfg) and read_metadata(again)["method_config"]["lr"] == 0.5
    assert read_metadata(again)["grpo_iteration"] == 1  # started over


# --------------------------------------------------------------------------- evolution strategies


def test_centered_ranks_are_scaled_ranks_and_ties_share_them():
    from synthnet.methods.es import centered_ranks

    u = centered_ranks(torch.tensor([3.0, 1.0, 2.0, 2.0], dtype=torch.float64))
    assert u.tolist() == [0.5, -0.5, 0.0, 0.0]  # ranks 3, 0, (1 + 2) / 2 twice, over n - 1 = 3, minus 0.5
    assert centered_ranks(torch.tensor([5.0, 5.0])).tolist() == [0.0, 0.0]
    v = centered_ranks(torch.randn(9, generator=torch.Generator().manual_seed(0)))
    assert v.min() == -0.5 and v.max() == 0.5 and abs(float(v.sum())) < 1e-6


def _es_toy(toy_layout, reward_of, iterations: int):
    from synthnet.methods import es

    torch.manual_seed(0)
    tokens, chunk = toy_layout.num_tokens, toy_layout.chunk_size
    policy = ShiftDenoiser(tokens, chunk)
    optimizer = torch.optim.Adam(policy.parameters(), lr=0.05)
    settings = es.ESSettings(inits_per_iteration=2, population=8, sigma=0.05, steps=2)
    history = es.train(policy, optimizer, layout=toy_layout, make_inits=lambda i: torch.zeros(2, tokens, chunk),
                       reward_fn=reward_of, settings=settings, iterations=iterations, progress=False)
    return policy, history


def test_es_moves_deterministic_output_toward_known_optimum(toy_layout):
    mask = toy_layout.mask.float()
    target = torch.randn(toy_layout.num_tokens, toy_layout.chunk_size, generator=torch.Generator().manual_seed(1)) * mask

    def reward_fn(final):
        return -(((final - target) * mask) ** 2).sum((1, 2))

    before = float((target * mask).norm())  # the zero-shift policy outputs its zero init
    policy, history = _es_toy(toy_layout, reward_fn, 40)
    with torch.no_grad():
        out = sample(policy, torch.zeros(1, *target.shape), toy_layout, 2).final[0]
    assert float(((out - target) * mask).norm()) < 0.5 * before
    assert history[-1]["reward_mean"] > history[0]["reward_mean"]
    assert history[0]["evaluations"] == 2 * 8 * 2 and history[0]["tie_fraction"] == 0.0


def test_es_with_a_constant_reward_leaves_the_generator_unchanged(toy_layout):
    policy, history = _es_toy(toy_layout, lambda final: torch.ones(final.shape[0]), 3)
    assert torch.equal(policy.shift, torch.zeros_like(policy.shift))  # every pair tied: no direction is preferred
    assert all(h["tie_fraction"] == 1.0 and h["gradient_norm"] == 0.0 for h in history)


def test_es_command_resumes_exactly_and_records_its_algorithm(tmp_path):
    from synthnet.commands.artifacts import read_records
    from synthnet.commands.train_grpo import train_grpo
    from synthnet.storage import load_state_dict, read_metadata

    straight = _grpo_config(tmp_path / "a", "method.iterations=2", "method.population=2", algorithm="es")
    _write_imitation_stand_in(straight)
    path = train_grpo(straight)
    header = read_metadata(path)
    assert header["algorithm"] == "es" and header["grpo_iteration"] == 2
    assert header["grpo_settings"]["population"] == 2 and "group_size" not in header["grpo_settings"]
    records = read_records(path.with_name("perceiver_moe-grpo.metrics.jsonl"))
    assert [r["evaluations"] for r in records] == [2 * 2 * 2] * 2  # 2 pairs x 2 candidates x B = 2 inits
    start, _ = load_state_dict(path.with_name("perceiver_moe-imitation.safetensors"))
    a, _ = load_state_dict(path)
    assert any(not torch.equal(start[k], a[k]) for k in a)

    first = _grpo_config(tmp_path / "b", "method.iterations=1", "method.population=2", algorithm="es")
    _write_imitation_stand_in(first)
    train_grpo(first)
    resumed = train_grpo(_grpo_config(tmp_path / "b", "method.iterations=2", "method.population=2", algorithm="es"))
    b, _ = load_state_dict(resumed)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


# --------------------------------------------------------------------------- the latent policy


def _latent_generator(layout, latent_dim=4):
    """A small Perceiver whose output depends on its conditioning (the head is not zero, as after training)."""
    from synthnet.generators.perceiver_moe import PerceiverMoEGenerator

    torch.manual_seed(0)
    options = dict(chunk_size=layout.chunk_size, d_model=16, num_latents=4, num_blocks=1, time_dim=8,
                   message_rank=4)
    source = PerceiverMoEGenerator(**options)
    torch.nn.init.normal_(source.head.weight, std=0.3)
    model = PerceiverMoEGenerator(**options, latent_dim=latent_dim)
    missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)
    assert sorted(missing) == ["latent_mean", "latent_proj.weight"] and not unexpected
    return source.eval(), model.eval()


def test_latent_with_zero_mean_is_the_source_generator_and_z_changes_it(toy_layout):
    from synthnet.methods.latent import attach_latent, generate_with_latents

    source, model = _latent_generator(toy_layout)
    attach_latent(model, 4, steps=2, seed=0)
    inits = torch.randn(3, toy_layout.num_tokens, toy_layout.chunk_size) * toy_layout.mask.float()
    with torch.no_grad():
        plain = sample(source, inits, toy_layout, 2).final
        assert torch.equal(sample(model, inits, toy_layout, 2).final, plain)  # m = 0 and no z: the source exactly
        assert torch.allclose(generate_with_latents(model, inits, toy_layout, 2, torch.zeros(3, 4)), plain)
        moved = generate_with_latents(model, inits, toy_layout, 2, torch.randn(3, 4))
    assert (moved - plain).abs().max() > 1e-3
    # z ~ N(0, I) moves the conditioning by about its own RMS over the schedule
    times = torch.tensor([0.0, 0.5, 1.0])
    with torch.no_grad():
        cond = model.conditioning(times[:-1], times[1:])
        shift = model.latent_proj(torch.randn(4096, 4, generator=torch.Generator().manual_seed(0)))
    assert float(shift.pow(2).mean().sqrt()) == pytest.approx(float(cond.pow(2).mean().sqrt()), rel=0.35)
    with pytest.raises(SynthNetError, match="latent of shape"):
        model(inits, times[:1].expand(3), times[1:2].expand(3), toy_layout, latent=torch.zeros(3, 5))
    with pytest.raises(SynthNetError, match="latent_dim 0"):
        source(inits, times[:1].expand(3), times[1:2].expand(3), toy_layout, latent=torch.zeros(3, 4))


def test_latent_log_prob_and_kl_match_closed_form():
    from synthnet.methods.latent import latent_kl, latent_log_prob

    z, mean = torch.randn(5, 3), torch.randn(3)
    expected = torch.distributions.Normal(mean, 0.7).log_prob(z).sum(-1)
    assert torch.allclose(latent_log_prob(z, mean, 0.7), expected, atol=1e-5)
    other = torch.randn(3)
    expected_kl = torch.distributions.kl_divergence(torch.distributions.Normal(mean, 0.7),
                                                    torch.distributions.Normal(other, 0.7)).sum()
    assert torch.allclose(latent_kl(mean, other, 0.7), expected_kl, atol=1e-5)


def test_latent_policy_moves_its_mean_toward_the_rewarded_latent(toy_layout):
    """The reward is highest for the networks the generator makes at a hidden z*: the mean must approach it,
    and the deterministic output (z = m, what generate makes) must get better."""
    from synthnet.methods import latent

    _, model = _latent_generator(toy_layout)
    latent.attach_latent(model, 4, steps=2, seed=0)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name == "latent_mean")
    mask = toy_layout.mask.float()
    inits = torch.randn(2, toy_layout.num_tokens, toy_layout.chunk_size,
                        generator=torch.Generator().manual_seed(3)) * mask
    best = torch.tensor([1.0, -1.0, 0.5, 0.0])
    target = latent.generate_with_latents(model, inits, toy_layout, 2, best.expand(2, 4))
    per_init = {i: target[i] for i in range(2)}

    def reward_fn(final):  # candidates are init-major: G = 8 per init
        goal = torch.stack([per_init[i // 8] for i in range(final.shape[0])])
        return -(((final - goal) * mask) ** 2).sum((1, 2))

    optimizer = torch.optim.Adam([model.latent_mean], lr=0.05)
    settings = latent.LatentSettings(inits_per_iteration=2, group_size=8, steps=2, latent_dim=4, latent_sigma=0.3,
                                     inner_epochs=2, beta=0.0)
    before = float(reward_fn(latent.generate_with_latents(model, inits.repeat_interleave(8, 0), toy_layout, 2,
                                                          model.latent_mean.detach().expand(16, 4))).mean())
    history = latent.train(model, optimizer, layout=toy_layout, make_inits=lambda i: inits, reward_fn=reward_fn,
                           settings=settings, iterations=60, reference_mean=torch.zeros(4), progress=False)
    after = float(reward_fn(latent.generate_with_latents(model, inits.repeat_interleave(8, 0), toy_layout, 2,
                                                         model.latent_mean.detach().expand(16, 4))).mean())
    assert float((model.latent_mean.detach() - best).norm()) < 0.5 * float(best.norm())
    assert after > 0.5 * before  # rewards are negative distances: at least halved
    assert history[0]["evaluations"] == 16 and history[-1]["kl"] > 0
    assert all(math.isfinite(h[k]) for h in history for k in ("reward_mean", "clip_fraction", "mean_norm"))


def test_latent_command_tunes_only_the_mean_resumes_exactly_and_generates(tmp_path):
    from synthnet.commands.train_grpo import train_grpo
    from synthnet.generation import generate_networks, target_layout
    from synthnet.generators import load_generator
    from synthnet.storage import load_state_dict, read_metadata

    options = ("method.latent_dim=4", "method.latent_sigma=0.5")
    straight = _grpo_config(tmp_path / "a", "method.iterations=2", *options, algorithm="latent")
    _write_imitation_stand_in(straight, head_std=0.3)
    path = train_grpo(straight)
    header = read_metadata(path)
    assert header["algorithm"] == "latent" and header["grpo_iteration"] == 2
    assert header["generator_config"]["latent_dim"] == 4 and header["grpo_settings"]["latent_sigma"] == 0.5
    start, _ = load_state_dict(path.with_name("perceiver_moe-imitation.safetensors"))
    tuned, _ = load_state_dict(path)
    assert set(tuned) - set(start) == {"latent_proj.weight", "latent_mean"}
    assert all(torch.equal(start[k], tuned[k]) for k in start)  # the rest of the generator is the environment
    assert tuned["latent_mean"].abs().max() > 0
    loaded = load_generator(path)
    _, layout = target_layout(loaded.target_config, (1, 8, 8), 10, loaded.chunk_size)
    networks = generate_networks(loaded.model, layout, loaded.target_config, (1, 8, 8), 10, [7], 2).state_dicts
    assert all(torch.isfinite(v).all() for v in networks[-1].values())

    first = _grpo_config(tmp_path / "b", "method.iterations=1", *options, algorithm="latent")
    _write_imitation_stand_in(first, head_std=0.3)
    train_grpo(first)
    resumed = train_grpo(_grpo_config(tmp_path / "b", "method.iterations=2", *options, algorithm="latent"))
    again, _ = load_state_dict(resumed)
    assert all(torch.allclose(tuned[k], again[k], atol=1e-6) for k in tuned)
    with pytest.raises(SynthNetError, match="already has a latent of 4"):  # tuning it again with another size
        train_grpo(_grpo_config(tmp_path / "a", "method.iterations=1", "method.latent_dim=8",
                                f"method.source={path}", "train.output=" + str(tmp_path / "c.safetensors"),
                                algorithm="latent"))
