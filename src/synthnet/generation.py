"""Generating networks: fresh random inits of the target -> K generator steps -> state dicts.

``generate_networks`` is the one path from a trained generator to weights; the
``generate`` command, the evaluation report and GRPO rollouts call it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from synthnet.errors import SynthNetError
from synthnet.sampling import SampleResult, sample
from synthnet.targets import build_target, init_state_dict
from synthnet.tokenization import TokenLayout, build_layout, detokenize, tokenize


def target_layout(target_config: Mapping, input_shape: Sequence[int], num_classes: int,
                  chunk_size: int, bias_chunk: bool = False) -> tuple[nn.Module, TokenLayout]:
    """The target model (a template) and its token layout for ``chunk_size`` (which holds the model);
    ``bias_chunk``: see :func:`synthnet.tokenization.build_layout`."""
    model = build_target(target_config, input_shape, num_classes)
    return model, build_layout(model.layer_specs(), model.state_dict(), chunk_size, network=model,
                               bias_chunk=bias_chunk)


def check_layout(layout: TokenLayout, num_values: int | None, what: str) -> None:
    """A generator of one fixed size (the flat baseline reads one flat vector of ``num_values``) serves only
    targets of exactly that many values; a token generator (``num_values`` None) serves any size."""
    if num_values is not None and layout.num_values != int(num_values):
        raise SynthNetError(f"{what} reads one flat vector of {num_values} values and cannot serve another size; "
                            f"this target has {layout.num_values}")


@dataclass
class GeneratedNetworks:
    """``state_dicts[k]`` holds the B networks after k steps, stacked: {name: (B, *shape)}."""

    result: SampleResult
    state_dicts: list[dict[str, torch.Tensor]]
    seconds: float
    seeds: list[int]


def init_tokens(target_config: Mapping, input_shape: Sequence[int], num_classes: int, seeds: Sequence[int],
                layout: TokenLayout) -> torch.Tensor:
    """Tokens (B, N, C) of the target's own random inits for ``seeds``."""
    return stacked_tokens([init_state_dict(target_config, input_shape, num_classes, int(s)) for s in seeds], layout)


def stacked_tokens(state_dicts: Sequence[Mapping[str, torch.Tensor]], layout: TokenLayout) -> torch.Tensor:
    """Tokens (B, N, C) of B state dicts of one target."""
    return tokenize({name: torch.stack([sd[name] for sd in state_dicts]) for name in state_dicts[0]}, layout)


def generate_networks(model, layout: TokenLayout, target_config: Mapping, input_shape: Sequence[int],
                      num_classes: int, seeds: Sequence[int], steps: int, *, noise_scale: float | Sequence[float] = 0.0,
                      rng: torch.Generator | None = None, device: str | torch.device | None = None,
                      times: torch.Tensor | None = None) -> GeneratedNetworks:
    """Run ``steps`` generator steps from the inits drawn with ``seeds`` (one network per seed).

    ``model`` is a denoiser (see :mod:`synthnet.sampling`); it runs on ``device`` (default:
    where its parameters are) without gradients (GRPO recomputes log-probs of the stored
    trajectory with :func:`synthnet.sampling.step_log_probs`). ``noise_scale > 0`` samples each
    step around the prediction with ``rng`` and fills ``result.log_probs``. Returned state dicts
    are on the CPU; ``result`` tensors stay on ``device``. ``seconds`` runs from the inits in hand
    (drawing them is not timed) to the state dicts in hand.
    """
    if device is None:
        params = list(model.parameters()) if isinstance(model, nn.Module) else []
        device = params[0].device if params else torch.device("cpu")
    inits = [init_state_dict(target_config, input_shape, num_classes, int(s)) for s in seeds]
    start = time.perf_counter()  # the clock starts with the inits in hand, as the SGD twins' does
    x0 = stacked_tokens(inits, layout).to(device)
    device_layout = layout.to(device)
    with torch.no_grad():
        result = sample(model, x0, device_layout, steps, noise_scale=noise_scale, generator=rng, times=times)
    state_dicts = [{k: v.cpu() for k, v in detokenize(x, layout).items()} for x in result.trajectory]
    return GeneratedNetworks(result, state_dicts, time.perf_counter() - start, [int(s) for s in seeds])
