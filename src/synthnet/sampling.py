"""The one sampling loop: generation, evaluation and GRPO rollouts all call :func:`sample`.

A *denoiser* is any callable ``denoiser(tokens, t_source, t_target, layout) -> tokens``
with tokens of shape (batch, tokens, chunk_size) in the normalised token space of
:mod:`synthnet.tokenization` and times of shape (batch,) in [0, 1] (fractions of training
progress: 0 is the random init, 1 the end of a zoo run). The network never sees the step
schedule; this module owns it.

Deterministic mode (``noise_scale = 0``): ``x_{k+1} = denoiser(x_k, t_k, t_{k+1})``.
Stochastic mode: ``x_{k+1} ~ N(denoiser(x_k, t_k, t_{k+1}), sigma_k^2 I)`` on the valid
(unpadded) values, and the exact log-density of every step is returned. We report it as
the **mean over valid dimensions** of the per-dimension Gaussian log-density (the
DDPO / Flow-GRPO convention): the sum over hundreds of thousands of weights would make
importance ratios ``exp(logp_new - logp_old)`` overflow for any non-trivial update, while
the mean keeps them O(1) and only rescales the objective. ``gaussian_log_prob`` also
returns the sum on request, for the closed-form tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from synthnet.tokenization import TokenLayout

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, TokenLayout], torch.Tensor]

# Without gradients the denoiser runs on slices of the batch holding at most this many tokens. Batch elements are
# independent, so the result is the same; what changes is that each activation stays a few MiB: one (16, 16554, 64)
# float tensor is 68 MiB, and every elementwise op on it allocates fresh pages, so a 1M-parameter target's batch of
# 16 took twice as long per network as a batch of 1 before (bench/cost.py).
NO_GRAD_TOKENS = 1 << 15


def denoise(denoiser: Denoiser, x: torch.Tensor, t_source: torch.Tensor, t_target: torch.Tensor,
            layout: TokenLayout) -> torch.Tensor:
    """``denoiser(x, t_source, t_target, layout)``; without gradients, in batch slices of bounded size."""
    per = max(1, NO_GRAD_TOKENS // max(1, x.shape[1]))
    if torch.is_grad_enabled() or x.shape[0] <= per:
        return denoiser(x, t_source, t_target, layout)
    return torch.cat([denoiser(x[i:i + per], t_source[i:i + per], t_target[i:i + per], layout)
                      for i in range(0, x.shape[0], per)])


def time_grid(steps: int, start: float = 0.0, end: float = 1.0) -> torch.Tensor:
    """``steps + 1`` evenly spaced times from ``start`` to ``end``: shape (steps + 1,)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    return torch.linspace(start, end, steps + 1)


def noise_scales(noise_scale: float | Sequence[float], steps: int) -> list[float]:
    """One standard deviation per step from a scalar (every step) or a list (the first steps; the steps
    after the list are deterministic, so ``[0.1]`` puts noise on the first step only)."""
    if isinstance(noise_scale, (int, float)):
        return [float(noise_scale)] * steps
    scales = [float(s) for s in noise_scale]
    if not scales or len(scales) > steps:
        raise ValueError(f"need 1 to {steps} per-step noise scales, got {len(scales)}")
    return scales + [0.0] * (steps - len(scales))


def gaussian_log_prob(sample: torch.Tensor, mean: torch.Tensor, std: float, mask: torch.Tensor,
                      reduce: str = "mean") -> torch.Tensor:
    """Log-density of ``sample`` under N(mean, std^2) per batch element over masked dims.

    sample, mean: (batch, tokens, chunk); mask: (tokens, chunk). Returns (batch,).
    ``reduce='mean'`` averages over valid dimensions, ``'sum'`` adds them.
    """
    mask = mask.to(sample.dtype)
    per_dim = -0.5 * ((sample - mean) / std) ** 2 - math.log(std) - 0.5 * math.log(2 * math.pi)
    total = (per_dim * mask).sum(dim=(-2, -1))
    return total / mask.sum() if reduce == "mean" else total


def gaussian_kl(mean_p: torch.Tensor, mean_q: torch.Tensor, std: float, mask: torch.Tensor) -> torch.Tensor:
    """KL(N(mean_p, std^2) || N(mean_q, std^2)), mean over valid dims: (batch,).

    With equal variances the KL is exactly ``(mean_p - mean_q)^2 / (2 std^2)`` per dimension."""
    mask = mask.to(mean_p.dtype)
    return ((mean_p - mean_q) ** 2 / (2 * std ** 2) * mask).sum(dim=(-2, -1)) / mask.sum()


@dataclass
class SampleResult:
    """Outputs of :func:`sample`. ``trajectory[k]`` is the state after k steps (0 = the init)."""

    final: torch.Tensor  # (batch, tokens, chunk)
    trajectory: list[torch.Tensor]  # steps + 1 tensors of (batch, tokens, chunk)
    means: list[torch.Tensor]  # per step, the denoiser's prediction (batch, tokens, chunk)
    log_probs: torch.Tensor | None  # (batch, steps) in stochastic mode, else None
    times: torch.Tensor  # (steps + 1,)


def sample(denoiser: Denoiser, init_tokens: torch.Tensor, layout: TokenLayout, steps: int, *,
           noise_scale: float | Sequence[float] = 0.0, generator: torch.Generator | None = None,
           times: torch.Tensor | None = None) -> SampleResult:
    """Run ``steps`` generation steps from ``init_tokens`` (batch, tokens, chunk).

    Padding positions are held at zero. With a positive noise scale each step samples
    around the prediction using ``generator`` (on the tokens' device) and the per-step
    log-probabilities are returned.
    """
    times = time_grid(steps) if times is None else times
    scales = noise_scales(noise_scale, steps)
    mask = layout.mask.to(init_tokens.device)
    valid = mask.to(init_tokens.dtype)
    x = init_tokens * valid
    batch = x.shape[0]
    trajectory, means, log_probs = [x], [], []
    stochastic = any(s > 0 for s in scales)
    for k in range(steps):
        t_source = times[k].expand(batch).to(x.device)
        t_target = times[k + 1].expand(batch).to(x.device)
        mean = denoise(denoiser, x, t_source, t_target, layout) * valid
        means.append(mean)
        if scales[k] > 0:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            x = (mean + scales[k] * noise * valid).detach()
            log_probs.append(gaussian_log_prob(x, mean, scales[k], mask))
        else:
            x = mean
            if stochastic:
                log_probs.append(torch.zeros(batch, device=x.device))
        trajectory.append(x)
    return SampleResult(x, trajectory, means, torch.stack(log_probs, dim=1) if stochastic else None, times)


def step_log_probs(denoiser: Denoiser, trajectory: Sequence[torch.Tensor], layout: TokenLayout, times: torch.Tensor,
                   noise_scale: float | Sequence[float]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Log-probabilities of a stored trajectory under ``denoiser`` (e.g. the updated policy).

    Returns ((batch, steps) log-probs, per-step predicted means). Steps with zero noise
    scale contribute zero (they are deterministic and carry no gradient signal)."""
    steps = len(trajectory) - 1
    scales = noise_scales(noise_scale, steps)
    mask = layout.mask.to(trajectory[0].device)
    valid = mask.to(trajectory[0].dtype)
    out, means = [], []
    for k in range(steps):
        batch = trajectory[k].shape[0]
        mean = denoiser(trajectory[k], times[k].expand(batch).to(valid.device),
                        times[k + 1].expand(batch).to(valid.device), layout) * valid
        means.append(mean)
        out.append(gaussian_log_prob(trajectory[k + 1], mean, scales[k], mask) if scales[k] > 0
                   else torch.zeros(batch, device=mean.device))
    return torch.stack(out, dim=1), means
