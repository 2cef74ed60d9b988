"""GRPO over a low-dimensional latent: the third optimiser of ``method=grpo`` (``method.algorithm=latent``).

GRPO over the sampled weights (:mod:`synthnet.methods.grpo`) explores in thousands of
dimensions at once, so each rollout carries little signal and its log-probabilities must be
averaged over weights before a ratio means anything. Here the policy acts in k dimensions
(``method.latent_dim``, 32 by default): every network gets one vector

    z ~ N(m, sigma^2 I_k)          (m = the generator's ``latent_mean``, sigma = ``method.latent_sigma``)

which shifts the generator's conditioning at every step (``PerceiverMoEGenerator(latent_dim=k)``);
given z the steps are deterministic. Rewards and advantages are GRPO's (G candidates per init,
normalised within the group); the PPO ratio is the exact density ratio of z, summed over its k
dimensions, so the clip bounds a real probability ratio; the KL to the start is exact,
``|m - m_0|^2 / (2 sigma^2)``. Only ``m`` learns: the rest of the generator is the environment
(a parameter that changes the network for a *given* z has no score-function gradient).
``generate`` uses z = m, the policy's mean (the optimised quantity is the expected reward over
z, which equals it as sigma -> 0).

:func:`attach_latent` gives a generator trained without a latent its projection: fixed, random,
scaled so that z ~ N(0, I) moves the conditioning by its own RMS over the sampler's steps, with
``m = 0`` (so the tuned generator starts exactly where its source was). Everything here takes
built objects; :mod:`synthnet.commands.train_grpo` builds them.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from synthnet.errors import SynthNetError
from synthnet.methods.grpo import GroupSettings, RewardFn, clipped_surrogate, group_advantages, tied_groups
from synthnet.options import check_options, option
from synthnet.sampling import NO_GRAD_TOKENS, sample, time_grid
from synthnet.tokenization import TokenLayout

log = logging.getLogger("synthnet")


@dataclass(frozen=True)
class LatentSettings(GroupSettings):
    """Knobs of one latent-policy run (each field's help: ``synthnet config method=grpo``)."""

    latent_dim: int = option(32, "algorithm=latent: k, the size of the per-network latent the policy samples",
                             low=1, high=1024)
    latent_sigma: float = option(0.25, "algorithm=latent: std of z around the policy's mean (z = N(0, I) shifts "
                                       "the conditioning by its own RMS)", low=0, low_open=True)

    def __post_init__(self):
        check_options(self, "method.")


def latent_log_prob(z: torch.Tensor, mean: torch.Tensor, sigma: float) -> torch.Tensor:
    """Exact log-density of z (R, k) under N(mean (k,), sigma^2 I), summed over the k dimensions: (R,)."""
    k = z.shape[-1]
    return -0.5 * (((z - mean) / sigma) ** 2).sum(dim=-1) - k * (math.log(sigma) + 0.5 * math.log(2 * math.pi))


def latent_kl(mean: torch.Tensor, reference: torch.Tensor, sigma: float) -> torch.Tensor:
    """KL(N(mean, sigma^2 I) || N(reference, sigma^2 I)) = |mean - reference|^2 / (2 sigma^2): a scalar."""
    return ((mean - reference) ** 2).sum() / (2 * sigma ** 2)


def attach_latent(model: nn.Module, latent_dim: int, steps: int, seed: int) -> None:
    """Give ``model`` (a PerceiverMoEGenerator built with ``latent_dim``, its other weights loaded) a fixed random
    projection scaled to the RMS of its conditioning over the ``steps``-step schedule, and ``latent_mean = 0``."""
    if getattr(model, "latent_dim", 0) != latent_dim:
        raise SynthNetError(f"the generator has latent_dim {getattr(model, 'latent_dim', 0)}, not {latent_dim}")
    times = time_grid(steps)
    device = model.latent_mean.device
    with torch.no_grad():
        cond = model.conditioning(times[:-1].to(device), times[1:].to(device))  # (steps, D)
        rms = float(cond.pow(2).mean().sqrt())
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        weight = torch.randn(model.latent_proj.weight.shape, generator=generator) * rms / math.sqrt(latent_dim)
        model.latent_proj.weight.copy_(weight.to(device))
        model.latent_mean.zero_()


@torch.no_grad()
def generate_with_latents(policy: nn.Module, init_tokens: torch.Tensor, layout: TokenLayout, steps: int,
                          latents: torch.Tensor) -> torch.Tensor:
    """Deterministic ``steps``-step outputs of ``policy`` from init_tokens (R, tokens, chunk), network r with
    latent ``latents[r]``: (R, tokens, chunk). Runs in slices of bounded size, as :func:`synthnet.sampling.denoise`."""
    per = max(1, NO_GRAD_TOKENS // max(1, init_tokens.shape[1]))
    outputs = []
    for i in range(0, init_tokens.shape[0], per):
        z = latents[i:i + per]

        def denoiser(x, t_source, t_target, lay, z=z):
            return policy(x, t_source, t_target, lay, latent=z)

        outputs.append(sample(denoiser, init_tokens[i:i + per], layout, steps).final)
    return torch.cat(outputs)


def latent_iteration(policy: nn.Module, reference_mean: torch.Tensor, optimizer: torch.optim.Optimizer,
                     init_tokens: torch.Tensor, layout: TokenLayout, reward_fn: RewardFn, settings: LatentSettings,
                     generator: torch.Generator) -> dict[str, float]:
    """One iteration from B fresh inits (B, tokens, chunk): G latents per init, rewards, GRPO updates of the mean."""
    start = time.perf_counter()
    sigma, groups, size = float(settings.latent_sigma), init_tokens.shape[0], int(settings.group_size)
    old_mean = policy.latent_mean.detach().clone()
    noise = torch.randn(groups * size, old_mean.numel(), generator=generator, device=generator.device)
    latents = old_mean + sigma * noise.to(old_mean.device)
    was_training = policy.training
    policy.eval()
    try:
        final = generate_with_latents(policy, init_tokens.repeat_interleave(size, dim=0), layout,
                                      int(settings.steps), latents)
    finally:
        policy.train(was_training)
    reward_start = time.perf_counter()
    rewards = reward_fn(final).detach().float().to(old_mean.device)
    reward_seconds = time.perf_counter() - reward_start
    if rewards.shape != (groups * size,) or not torch.isfinite(rewards).all():
        raise SynthNetError(f"reward function must return {groups * size} finite values, got shape "
                            f"{tuple(rewards.shape)}")
    grouped = rewards.reshape(groups, size)
    advantages = group_advantages(grouped, settings.advantage_eps).reshape(-1)
    old_log_probs = latent_log_prob(latents, old_mean, sigma)
    sums = {"loss": 0.0, "surrogate": 0.0, "kl": 0.0, "clip_fraction": 0.0}
    for _ in range(int(settings.inner_epochs)):
        new_log_probs = latent_log_prob(latents, policy.latent_mean, sigma)
        surrogate, clip_fraction = clipped_surrogate(new_log_probs, old_log_probs, advantages, settings.clip_epsilon)
        kl = latent_kl(policy.latent_mean, reference_mean, sigma)
        loss = surrogate + settings.beta * kl
        if not torch.isfinite(loss):
            raise SynthNetError("latent GRPO loss became non-finite; lower method.lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for key, value in (("loss", loss), ("surrogate", surrogate), ("kl", kl), ("clip_fraction", clip_fraction)):
            sums[key] += float(value.detach())
    stats = {k: v / int(settings.inner_epochs) for k, v in sums.items()}
    stats.update(reward_mean=float(rewards.mean()), reward_max=float(rewards.max()), reward_min=float(rewards.min()),
                 reward_std=float(rewards.std(unbiased=False)),
                 tie_fraction=float(tied_groups(grouped).float().mean()),
                 mean_norm=float(policy.latent_mean.detach().norm()), evaluations=int(rewards.shape[0]),
                 reward_seconds=reward_seconds, evaluations_per_second=rewards.shape[0] / max(reward_seconds, 1e-9),
                 seconds=time.perf_counter() - start)
    return stats


def train(policy: nn.Module, optimizer: torch.optim.Optimizer, *, layout: TokenLayout,
          make_inits: Callable[[int], torch.Tensor], reward_fn: RewardFn, settings: LatentSettings, iterations: int,
          reference_mean: torch.Tensor, start_iteration: int = 0, noise_seed: int = 0,
          on_iteration: Callable[[int, dict[str, float]], None] | None = None,
          log_every: int = 1, progress: bool = True) -> list[dict[str, float]]:
    """Run iterations ``start_iteration .. iterations - 1`` (the signature of :func:`synthnet.methods.grpo.train`,
    the reference being the start's latent mean). ``optimizer`` must hold ``policy.latent_mean`` alone; the
    latents of iteration i come from a generator seeded with ``noise_seed + i``, so a resumed run draws what an
    uninterrupted one would."""
    if getattr(policy, "latent_dim", 0) < 1:
        raise SynthNetError("method.algorithm=latent needs a generator with a latent (generator perceiver_moe)")
    history = []
    bar = tqdm(range(start_iteration, iterations), initial=start_iteration, total=iterations, desc="latent",
               disable=not progress, leave=False)
    for iteration in bar:
        init_tokens = make_inits(iteration)
        generator = torch.Generator(device="cpu").manual_seed(int(noise_seed) + iteration)
        stats = latent_iteration(policy, reference_mean, optimizer, init_tokens, layout, reward_fn, settings,
                                 generator)
        stats["iteration"] = iteration + 1
        history.append(stats)
        bar.set_postfix(reward=f"{stats['reward_mean']:.4f}", kl=f"{stats['kl']:.2e}")
        if log_every and ((iteration + 1) % int(log_every) == 0 or iteration + 1 == iterations):
            log.info("latent iteration %d/%d reward %.4f (max %.4f, std %.4f) ties %.2f kl %.3e clip %.3f |m| %.3f "
                     "%.2f s/it %.0f evals/s", iteration + 1, iterations, stats["reward_mean"], stats["reward_max"],
                     stats["reward_std"], stats["tie_fraction"], stats["kl"], stats["clip_fraction"],
                     stats["mean_norm"], stats["seconds"], stats["evaluations_per_second"])
        if on_iteration is not None:
            on_iteration(iteration, stats)
    bar.close()
    return history
