"""Evolution strategies on the generator's parameters: the other optimiser of ``method=grpo``.

GRPO (:mod:`synthnet.methods.grpo`) explores in the generator's *outputs* (Gaussian noise on
the sampled weights) and must then optimise stochastic rollouts that ``generate`` never
produces. Evolution strategies explore in the generator's *parameters* instead (Salimans et
al. 2017): every candidate is the deterministic output of a perturbed generator, so the
number optimised is exactly the number ``generate`` and ``evaluate`` report, and a scalar
reward with no gradient (accuracy after pruning or quantization) needs nothing else.

One iteration (:func:`es_iteration`), for parameters ``theta`` (every trainable tensor,
flattened to one vector of n values):

1. ``P`` directions ``eps_i ~ N(0, I_n)``, each used twice (antithetic: ``theta + sigma eps_i``
   and ``theta - sigma eps_i``); the noise of direction i comes from a generator seeded by
   the iteration and i, so a resumed run draws what an uninterrupted one would;
2. each of the 2P perturbed generators maps the *same* B fresh inits to networks in
   ``steps`` deterministic steps (common random numbers: candidates differ only by their
   parameters), and a candidate's reward is the mean over its B networks;
3. the 2P rewards become centred ranks ``u`` in [-0.5, 0.5] (fitness shaping: invariant to
   the reward's scale, robust to ties), and the gradient estimate is
   ``g = sum_i (u_i+ - u_i-) eps_i / (2 P sigma)``;
4. Adam takes a step on ``-g`` (the optimiser owned by the caller), so ``method.lr`` is the
   step size per parameter as in every other method.

The reward function is the one GRPO uses (:class:`synthnet.methods.rewards.Reward`); a
candidate costs B reward evaluations, an iteration ``2 P B``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters
from tqdm.auto import tqdm

from synthnet.errors import SynthNetError
from synthnet.options import check_options, option
from synthnet.sampling import sample
from synthnet.tokenization import TokenLayout

log = logging.getLogger("synthnet")

RewardFn = Callable[[torch.Tensor], torch.Tensor]  # final tokens (R, tokens, chunk) -> rewards (R,)


@dataclass(frozen=True)
class ESSettings:
    """Knobs of one evolution-strategies run (each field's help: ``synthnet config method=grpo``)."""

    inits_per_iteration: int = option(4, "B fresh random inits per iteration, shared by every candidate", low=1)
    population: int = option(4, "P antithetic pairs of parameter perturbations per iteration (2 P B reward calls)",
                             low=1)
    sigma: float = option(0.01, "std of each parameter perturbation (absolute, every trainable tensor)", low=0,
                          low_open=True)
    steps: int = option(4, "generation steps from t = 0 to t = 1", low=1)

    def __post_init__(self):
        check_options(self, "method.")


def centered_ranks(values: torch.Tensor) -> torch.Tensor:
    """(n,) -> (n,) ranks scaled to [-0.5, 0.5]; tied values share the mean of their ranks (so a pair
    that ties contributes exactly nothing)."""
    n = values.numel()
    if n == 1:
        return torch.zeros_like(values)
    order = values.argsort(stable=True)
    ranks = torch.empty(n, dtype=torch.float64)
    ranks[order] = torch.arange(n, dtype=torch.float64)
    unique, inverse = values.unique(return_inverse=True)
    mean_rank = torch.zeros(unique.numel(), dtype=torch.float64).index_add_(0, inverse, ranks) / \
        torch.bincount(inverse, minlength=unique.numel()).double()
    return (mean_rank[inverse] / (n - 1) - 0.5).to(values.dtype)


def direction(n: int, seed: int, device: torch.device) -> torch.Tensor:
    """The i-th perturbation direction: (n,) standard normal from its own seed (regenerated, never stored)."""
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(n, generator=generator).to(device)


@torch.no_grad()
def es_iteration(policy: nn.Module, optimizer: torch.optim.Optimizer, init_tokens: torch.Tensor, layout: TokenLayout,
                 reward_fn: RewardFn, settings: ESSettings, seed: int) -> dict[str, float]:
    """One ES step from B inits ``init_tokens`` (B, tokens, chunk); updates ``policy`` in place."""
    start = time.perf_counter()
    parameters = [p for p in policy.parameters() if p.requires_grad]
    if not parameters:
        raise SynthNetError("the generator has no trainable parameters for evolution strategies")
    centre = parameters_to_vector(parameters).detach().clone()
    n, pairs, sigma = centre.numel(), int(settings.population), float(settings.sigma)
    count = init_tokens.shape[0]
    rewards = torch.empty(pairs, 2, dtype=torch.float64)
    reward_seconds = 0.0
    was_training = policy.training
    policy.eval()  # the candidates are what generate produces: deterministic, eval mode
    try:
        for i in range(pairs):
            eps = direction(n, seed * 1_000_003 + i, centre.device)
            for j, sign in enumerate((1.0, -1.0)):
                vector_to_parameters(centre + sign * sigma * eps, parameters)
                final = sample(policy, init_tokens, layout, int(settings.steps)).final
                reward_start = time.perf_counter()
                values = reward_fn(final).detach().double().cpu()
                reward_seconds += time.perf_counter() - reward_start
                if values.shape != (count,) or not torch.isfinite(values).all():
                    raise SynthNetError(f"reward function must return {count} finite values, got shape "
                                        f"{tuple(values.shape)}")
                rewards[i, j] = values.mean()
    finally:
        vector_to_parameters(centre, parameters)
        policy.train(was_training)
    utilities = centered_ranks(rewards.reshape(-1)).reshape(pairs, 2)
    weights = (utilities[:, 0] - utilities[:, 1]).float()
    estimate = torch.zeros_like(centre)
    for i in range(pairs):
        if weights[i] != 0:
            estimate.add_(direction(n, seed * 1_000_003 + i, centre.device), alpha=float(weights[i]))
    estimate /= 2 * pairs * sigma
    norm = float(estimate.norm())
    with torch.enable_grad():
        optimizer.zero_grad(set_to_none=True)
        offset = 0
        for p in parameters:  # minimise -reward: the gradient is minus the ascent estimate
            p.grad = -estimate[offset:offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        optimizer.step()
    flat = rewards.reshape(-1)
    return {"reward_mean": float(flat.mean()), "reward_max": float(flat.max()), "reward_min": float(flat.min()),
            "reward_std": float(flat.std(unbiased=False)),
            "tie_fraction": float((rewards[:, 0] == rewards[:, 1]).float().mean()),
            "gradient_norm": norm, "evaluations": 2 * pairs * count, "reward_seconds": reward_seconds,
            "evaluations_per_second": 2 * pairs * count / max(reward_seconds, 1e-9),
            "seconds": time.perf_counter() - start}


def train(policy: nn.Module, optimizer: torch.optim.Optimizer, *, layout: TokenLayout,
          make_inits: Callable[[int], torch.Tensor], reward_fn: RewardFn, settings: ESSettings, iterations: int,
          start_iteration: int = 0, noise_seed: int = 0,
          on_iteration: Callable[[int, dict[str, float]], None] | None = None,
          log_every: int = 1, progress: bool = True) -> list[dict[str, float]]:
    """Run ES iterations ``start_iteration .. iterations - 1``; the signature of
    :func:`synthnet.methods.grpo.train` less the reference (ES has no KL term: its drift from the
    start is measured on outputs by ``bench/exploration.py``). Direction seeds come from
    ``noise_seed + iteration``, so a resumed run equals an uninterrupted one."""
    history = []
    bar = tqdm(range(start_iteration, iterations), initial=start_iteration, total=iterations, desc="es",
               disable=not progress, leave=False)
    for iteration in bar:
        stats = es_iteration(policy, optimizer, make_inits(iteration), layout, reward_fn, settings,
                             int(noise_seed) + iteration)
        stats["iteration"] = iteration + 1
        history.append(stats)
        bar.set_postfix(reward=f"{stats['reward_mean']:.4f}")
        if log_every and ((iteration + 1) % int(log_every) == 0 or iteration + 1 == iterations):
            log.info("es iteration %d/%d reward %.4f (max %.4f, std %.4f) tied pairs %.2f |g| %.3e %.2f s/it "
                     "%.0f evals/s", iteration + 1, iterations, stats["reward_mean"], stats["reward_max"],
                     stats["reward_std"], stats["tie_fraction"], stats["gradient_norm"], stats["seconds"],
                     stats["evaluations_per_second"])
        if on_iteration is not None:
            on_iteration(iteration, stats)
    bar.close()
    policy.eval()
    return history
