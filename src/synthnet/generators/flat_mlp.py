"""The proof of concept's flat denoiser, kept as a baseline: one MLP over the whole flattened state dict.

All valid (unpadded) token values, i.e. every weight of the target in the tokenizer's
per-layer scale, form one vector (B, V); sinusoidal embeddings of ``t_source``,
``t_target`` and their gap join it; an MLP maps it to the vector at ``t_target`` (or to the
difference, with ``predict='delta'``). It is tied to one architecture (V is fixed when it
is built) and sees no structure at all: the comparison point for the Perceiver.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from synthnet.errors import SynthNetError
from synthnet.generators.perceiver_moe import TimeConditioning
from synthnet.tokenization import TokenLayout


class FlatMLPGenerator(nn.Module):
    """Denoiser ``(tokens (B, N, C), t_source (B,), t_target (B,), layout) -> tokens (B, N, C)``."""

    def __init__(self, *, num_values: int, hidden: int = 512, num_layers: int = 2, time_dim: int = 64,
                 condition_dim: int = 0, predict: str = "delta"):
        super().__init__()
        if predict not in ("delta", "direct"):
            raise SynthNetError(f"generator.predict must be 'delta' or 'direct', got '{predict}'")
        self.num_values, self.predict = num_values, predict
        self.conditioning = TimeConditioning(d_model=hidden, time_dim=time_dim, condition_dim=condition_dim)
        self.input = nn.Linear(num_values, hidden)
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(max(num_layers - 1, 0)))
        self.act = nn.SiLU()
        self.output = nn.Linear(hidden, num_values)
        if predict == "delta":
            nn.init.zeros_(self.output.weight)
            nn.init.zeros_(self.output.bias)

    def forward(self, tokens: torch.Tensor, t_source: torch.Tensor, t_target: torch.Tensor, layout: TokenLayout,
                condition: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, N, C) -> (B, N, C); the valid values are flattened to (B, V) in between."""
        mask = layout.mask.to(tokens.device)
        if int(mask.sum()) != self.num_values:
            raise SynthNetError(f"this flat generator was built for {self.num_values} weights; "
                                f"the target has {int(mask.sum())}")
        flat = tokens[:, mask]  # (B, V)
        h = self.act(self.input(flat) + self.conditioning(t_source, t_target, condition))
        for layer in self.layers:
            h = self.act(layer(h))
        out = self.output(h)
        if self.predict == "delta":
            out = flat + out
        result = tokens.new_zeros(tokens.shape)
        result[:, mask] = out
        return result

    def auxiliary_loss(self) -> torch.Tensor:
        return self.output.weight.new_zeros(())

    def expert_usage(self) -> dict[str, Any] | None:
        return None
