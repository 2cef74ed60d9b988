"""GRPO: reinforcement learning of a generator on the functional score of what it generates.

The policy is the shared sampler of :mod:`synthnet.sampling` in stochastic mode: step k
draws ``x_{k+1} ~ N(f(x_k, t_k, t_{k+1}), sigma_k^2 I)`` around the generator's
prediction ``f``. Per-step log-probabilities are exact Gaussian log-densities, reported as
the **mean over the valid (unpadded) dimensions** (DDPO / Flow-GRPO): the sum over
thousands of weights would turn any update into an overflowing importance ratio; the
mean keeps ``exp(logp_new - logp_old)`` O(1) so the clip range means the same thing for
every target size, and only rescales the gradient (Adam undoes the scale).

One iteration (:func:`grpo_iteration`):

1. rollouts: each of B inits is repeated G times and sampled stochastically
   (:func:`rollout`); the final tokens are scored by a reward function (no gradient);
2. advantages are normalised within each group: ``(r - mean) / (std + eps)``, exactly 0
   for groups whose rewards all tie (:func:`group_advantages`);
3. ``inner_epochs`` passes over the stored rollouts minimise the PPO clipped surrogate
   on per-step importance ratios (:func:`clipped_surrogate`) plus ``beta`` times the
   exact KL between the policy's and the frozen reference's Gaussian steps at the stored
   states (:func:`policy_kl`; with equal variances it is ``|mu_p - mu_q|^2 / (2 sigma^2)``
   per dimension, averaged over dimensions like the log-probs, and over noisy steps).

Everything here takes built objects (policy, reference, optimiser, reward function) and
never reads config; :mod:`synthnet.commands.train_grpo` builds them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from synthnet.errors import SynthNetError
from synthnet.options import check_options, option
from synthnet.sampling import gaussian_kl, noise_scales, sample, step_log_probs
from synthnet.tokenization import TokenLayout

log = logging.getLogger("synthnet")

RewardFn = Callable[[torch.Tensor], torch.Tensor]  # final tokens (R, tokens, chunk) -> rewards (R,)


@dataclass(frozen=True)
class GroupSettings:
    """What every group-relative policy shares (GRPO here, the latent policy of :mod:`synthnet.methods.latent`)."""

    inits_per_iteration: int = option(4, "B fresh random inits per iteration", low=1)
    group_size: int = option(8, "G stochastic candidates per init (advantages compare within a group)", low=2)
    steps: int = option(4, "generation steps from t = 0 to t = 1", low=1)
    clip_epsilon: float = option(0.2, "PPO clip range of the importance ratio (grpo: per step, log-probs are means "
                                      "over dims; latent: the density ratio of z)", low=0, high=1, low_open=True,
                                 high_open=True)
    inner_epochs: int = option(2, "passes over each iteration's stored rollouts", low=1)
    beta: float = option(0.01, "weight of the exact KL to the frozen starting generator (latent: to the starting "
                               "mean of z; 0 allowed)", low=0)
    advantage_eps: float = option(1e-4, "(r - mean) / (std + eps) within each group", low=0, low_open=True)


@dataclass(frozen=True)
class GRPOSettings(GroupSettings):
    """Knobs of one GRPO run (their meaning: each field's help, printed by ``synthnet config method=grpo``)."""

    noise_scale: float | tuple[float, ...] = option(
        (0.1,), "sigma of the stochastic steps, in token units: a number for every step, a list for the first "
                "steps (the rest deterministic; bench/exploration.py: noise on the first step only beat every step)",
        low=0, each=True)
    minibatch_size: int = option(0, "candidates per gradient step; 0 = all B * G at once", low=0)
    max_grad_norm: float = option(1.0, "0 = no gradient clipping", low=0)
    aux_loss_weight: float = option(0.0, "weight of the generator's auxiliary (MoE load-balancing) loss", low=0)

    def __post_init__(self):
        check_options(self, "method.")
        scales = noise_scales(self.noise_scale if isinstance(self.noise_scale, (int, float))
                              else list(self.noise_scale), int(self.steps))
        if not any(s > 0 for s in scales):
            raise SynthNetError(f"method.noise_scale must be >= 0 with at least one positive step, got {self.noise_scale}")

    @property
    def scales(self) -> list[float]:
        return noise_scales(self.noise_scale if isinstance(self.noise_scale, (int, float))
                            else list(self.noise_scale), int(self.steps))


# --------------------------------------------------------------------------- pure maths


def tied_groups(rewards: torch.Tensor) -> torch.Tensor:
    """(groups, G) rewards -> (groups,) bool: True where every candidate scored the same."""
    return rewards.max(dim=1).values == rewards.min(dim=1).values


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """(groups, G) -> (groups, G): ``(r - mean) / (std + eps)`` within each group.

    ``std`` is the population standard deviation (defined for any G >= 1). Groups whose
    rewards all tie get exactly zero advantage (no learning signal, no float residue)."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, unbiased=False, keepdim=True)
    advantages = (rewards - mean) / (std + eps)
    return torch.where(tied_groups(rewards)[:, None], torch.zeros_like(advantages), advantages)


def clipped_surrogate(new_log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                      clip_epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO clipped objective, as a loss to minimise, and the fraction of clipped ratios.

    new/old log-probs: (R, steps) per-step log-probabilities (or (R,)); advantages: (R,),
    shared by every step of a candidate. ``ratio = exp(new - old)``; the loss is the mean
    over candidates and steps of ``max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))``.
    """
    ratio = torch.exp(new_log_probs - old_log_probs.detach())
    advantages = advantages.detach().reshape(-1, *([1] * (ratio.dim() - 1))).expand_as(ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_epsilon, 1 + clip_epsilon)
    loss = torch.maximum(unclipped, clipped).mean()
    clip_fraction = ((ratio - 1).abs() > clip_epsilon).float().mean()
    return loss, clip_fraction.detach()


def policy_kl(policy_means: Sequence[torch.Tensor], reference_means: Sequence[torch.Tensor],
              scales: Sequence[float], mask: torch.Tensor) -> torch.Tensor:
    """Exact KL(policy step || reference step) averaged over noisy steps: (R,).

    means: per step (R, tokens, chunk); mask: (tokens, chunk). Both steps are Gaussians of
    the same std ``sigma_k``, so each step's KL is :func:`synthnet.sampling.gaussian_kl`
    (mean over valid dimensions). Deterministic steps (sigma = 0) have no density; skipped."""
    terms = [gaussian_kl(p, q, s, mask) for p, q, s in zip(policy_means, reference_means, scales) if s > 0]
    return torch.stack(terms, dim=1).mean(dim=1)


# --------------------------------------------------------------------------- rollouts and updates


@dataclass
class Rollout:
    """G stochastic candidates for each of B inits, flattened init-major: candidate ``b * G + g``."""

    trajectory: list[torch.Tensor]  # steps + 1 tensors (B * G, tokens, chunk), detached
    log_probs: torch.Tensor  # (B * G, steps), under the policy that sampled them
    times: torch.Tensor  # (steps + 1,)
    group_size: int
    rewards: torch.Tensor | None = None  # (B * G,)

    @property
    def final(self) -> torch.Tensor:
        return self.trajectory[-1]

    @property
    def num_groups(self) -> int:
        return self.trajectory[0].shape[0] // self.group_size


@torch.no_grad()
def rollout(policy: nn.Module, init_tokens: torch.Tensor, layout: TokenLayout, *, group_size: int, steps: int,
            noise_scale: float | Sequence[float], generator: torch.Generator | None = None) -> Rollout:
    """Sample ``group_size`` candidates from each init: init_tokens (B, tokens, chunk)."""
    starts = init_tokens.repeat_interleave(group_size, dim=0)  # (B * G, tokens, chunk)
    result = sample(policy, starts, layout, steps, noise_scale=noise_scale, generator=generator)
    return Rollout([x.detach() for x in result.trajectory], result.log_probs.detach(), result.times, group_size)


def grpo_update(policy: nn.Module, reference: nn.Module, optimizer: torch.optim.Optimizer, batch: Rollout,
                advantages: torch.Tensor, layout: TokenLayout, settings: GRPOSettings,
                generator: torch.Generator | None = None) -> dict[str, float]:
    """``inner_epochs`` passes of clipped-surrogate + ``beta`` * KL steps over one rollout.

    advantages: (B * G,). Returns the means over all gradient steps of loss, surrogate, KL
    to the reference, clip fraction and approximate KL to the sampling policy."""
    scales = settings.scales
    noisy = [k for k, s in enumerate(scales) if s > 0]
    mask = layout.mask.to(batch.final.device)
    count = batch.final.shape[0]
    with torch.no_grad():  # the reference is frozen and the states are stored: its means once
        _, reference_means = step_log_probs(reference, batch.trajectory, layout, batch.times, scales)
    size = count if settings.minibatch_size <= 0 else min(int(settings.minibatch_size), count)
    sums = {"loss": 0.0, "surrogate": 0.0, "kl": 0.0, "clip_fraction": 0.0, "approx_kl": 0.0}
    updates = 0
    parameters = [p for p in policy.parameters() if p.requires_grad]
    for _ in range(int(settings.inner_epochs)):
        order = torch.randperm(count, generator=generator).to(batch.final.device) if size < count \
            else torch.arange(count, device=batch.final.device)
        for start in range(0, count, size):
            index = order[start:start + size]
            states = [x[index] for x in batch.trajectory]
            new_log_probs, means = step_log_probs(policy, states, layout, batch.times, scales)
            old = batch.log_probs[index][:, noisy]
            new = new_log_probs[:, noisy]
            surrogate, clip_fraction = clipped_surrogate(new, old, advantages[index], settings.clip_epsilon)
            kl = policy_kl(means, [m[index] for m in reference_means], scales, mask).mean()
            loss = surrogate + settings.beta * kl
            if settings.aux_loss_weight and hasattr(policy, "auxiliary_loss"):
                loss = loss + settings.aux_loss_weight * policy.auxiliary_loss()
            if not torch.isfinite(loss):
                raise SynthNetError("GRPO loss became non-finite; lower method.lr or raise method.noise_scale")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if settings.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(parameters, settings.max_grad_norm)
            optimizer.step()
            updates += 1
            sums["loss"] += float(loss.detach())
            sums["surrogate"] += float(surrogate.detach())
            sums["kl"] += float(kl.detach())
            sums["clip_fraction"] += float(clip_fraction)
            sums["approx_kl"] += float((old - new.detach()).mean())
    return {k: v / max(updates, 1) for k, v in sums.items()}


@dataclass
class IterationResult:
    stats: dict[str, float]
    rollout: Rollout


def grpo_iteration(policy: nn.Module, reference: nn.Module, optimizer: torch.optim.Optimizer,
                   init_tokens: torch.Tensor, layout: TokenLayout, reward_fn: RewardFn, settings: GRPOSettings,
                   generator: torch.Generator | None = None) -> IterationResult:
    """One GRPO iteration from B fresh inits ``init_tokens`` (B, tokens, chunk).

    ``reward_fn`` maps final tokens (B * G, tokens, chunk) to rewards (B * G,) without
    gradient. ``generator`` drives the sampling noise and the minibatch order."""
    start = time.perf_counter()
    batch = rollout(policy, init_tokens, layout, group_size=settings.group_size, steps=settings.steps,
                    noise_scale=settings.scales, generator=generator)
    reward_start = time.perf_counter()
    rewards = reward_fn(batch.final).detach().float().to(batch.final.device)  # (B * G,)
    reward_seconds = time.perf_counter() - reward_start
    if rewards.shape != (batch.final.shape[0],) or not torch.isfinite(rewards).all():
        raise SynthNetError(f"reward function must return {batch.final.shape[0]} finite values, "
                            f"got shape {tuple(rewards.shape)}")
    batch.rewards = rewards
    grouped = rewards.reshape(batch.num_groups, settings.group_size)
    advantages = group_advantages(grouped, settings.advantage_eps).reshape(-1)
    update_generator = None
    if generator is not None and generator.device.type == "cpu":
        update_generator = generator
    stats = grpo_update(policy, reference, optimizer, batch, advantages, layout, settings, update_generator)
    stats.update(reward_mean=float(rewards.mean()), reward_max=float(rewards.max()),
                 reward_min=float(rewards.min()), reward_std=float(rewards.std(unbiased=False)),
                 tie_fraction=float(tied_groups(grouped).float().mean()),
                 evaluations=int(rewards.shape[0]), reward_seconds=reward_seconds,
                 evaluations_per_second=rewards.shape[0] / max(reward_seconds, 1e-9),
                 seconds=time.perf_counter() - start)
    return IterationResult(stats, batch)


def train(policy: nn.Module, reference: nn.Module, optimizer: torch.optim.Optimizer, *, layout: TokenLayout,
          make_inits: Callable[[int], torch.Tensor], reward_fn: RewardFn, settings: GRPOSettings, iterations: int,
          start_iteration: int = 0, noise_seed: int = 0,
          on_iteration: Callable[[int, dict[str, float]], None] | None = None,
          log_every: int = 1, progress: bool = True) -> list[dict[str, float]]:
    """Run GRPO iterations ``start_iteration .. iterations - 1`` and return their stats.

    ``make_inits(iteration)`` returns that iteration's fresh inits (B, tokens, chunk) (the
    caller owns the seeds); the sampling noise of iteration i comes from a generator seeded
    with ``noise_seed + i`` on the tokens' device, so a resumed run draws what an
    uninterrupted one would. ``on_iteration(i, stats)`` runs after each update (logging,
    checkpointing). The reference is put in eval mode and never receives gradients."""
    reference.eval()
    for parameter in reference.parameters():
        parameter.requires_grad_(False)
    history = []
    bar = tqdm(range(start_iteration, iterations), initial=start_iteration, total=iterations, desc="grpo",
               disable=not progress, leave=False)
    for iteration in bar:
        init_tokens = make_inits(iteration)
        generator = torch.Generator(device=init_tokens.device).manual_seed(int(noise_seed) + iteration)
        policy.train()
        stats = grpo_iteration(policy, reference, optimizer, init_tokens, layout, reward_fn, settings,
                               generator).stats
        stats["iteration"] = iteration + 1
        history.append(stats)
        bar.set_postfix(reward=f"{stats['reward_mean']:.4f}", kl=f"{stats['kl']:.2e}")
        if log_every and ((iteration + 1) % int(log_every) == 0 or iteration + 1 == iterations):
            log.info("grpo iteration %d/%d reward %.4f (max %.4f, std %.4f) ties %.2f kl %.3e clip %.3f "
                     "%.2f s/it %.0f evals/s", iteration + 1, iterations, stats["reward_mean"], stats["reward_max"],
                     stats["reward_std"], stats["tie_fraction"], stats["kl"], stats["clip_fraction"],
                     stats["seconds"], stats["evaluations_per_second"])
        if on_iteration is not None:
            on_iteration(iteration, stats)
    bar.close()
    policy.eval()
    return history

