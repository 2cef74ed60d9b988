"""Perceiver IO generator with Mixture-of-Experts latent blocks, on ``scaled_dot_product_attention``.

Data flow (B batch, N tokens, C chunk values, M latents, D model width)::

    tokens (B, N, C) --embed + token features + time--> queries (B, N, D)
    latents (M, D) --cross-attend to queries--> (B, M, D)
    L x [adaLN self-attention, adaLN Mixture-of-Experts feed-forward]    (B, M, D)
    queries --cross-attend to latents--> per-token outputs (B, N, D) --head--> (B, N, C)

The output has exactly the input's structure: one output per input token. Token features
describe what a token is (layer depth, kind, read-out or hidden, chunk position, fan-in /
fan-out), never which hidden neuron it is, so the network treats the tokens of a hidden
layer as a set: permuting the token order within a hidden layer permutes the output in the
same way. Read-out tokens also carry their class index: classes are labelled, not symmetric.

**Neuron messages** (``neuron_messages=True``). A set model alone cannot tell which column
of layer ``l + 1`` belongs to which hidden neuron of layer ``l``, yet every useful update
of a hidden neuron depends on its outgoing weights and every update of those outgoing
weights on what the neuron computes. Two permutation-equivariant paths pass that
information along the real connections of the network:

* in: each hidden neuron ``j`` of layer ``l`` receives ``sum_c W_{l+1}[c, j] A(row_c) / n_c``,
  its outgoing weights weighted by an embedding of the receiving rows, added to its tokens;
* out: each weight ``W_l[c, j]`` that connects to a hidden neuron gets an extra bilinear
  update ``<P(row_c), Q(neuron_j)>`` from the decoder's row embeddings.

Both follow a hidden permutation exactly; only the plain per-token path sees the values
inside a token in a fixed order (``tests/test_generators.py`` pins down the consequences).

**Probes** (``probes=P > 0``). A hidden neuron's incoming weights say what it computes only in the
first layer; deeper, it depends on every layer below. The generator keeps ``P`` learned inputs
(parameters, trained with everything else; no data is read at generation time), runs the
networks its input tokens describe on them (``torch.func`` under ``vmap``, differentiably) and
adds to each neuron's tokens an embedding of its pre-activation responses (mean and max over
positions, normalised per network and layer). Responses move with their neuron under any
hidden permutation, so this path is exactly equivariant. It needs the target module, which
:func:`synthnet.generation.target_layout` puts in the layout.

**Set rows** (``set_rows=True``). The row of a neuron fed by hidden units lists its incoming weights in the order
of those units, which is arbitrary; a per-token path that reads slot ``i`` as "input unit ``i``" learns nothing
that holds on another network, and for a width it never saw, slots it never saw. With set rows, such rows (every
MLP layer after the first) are read as sets: an embedding of order-free statistics of the row (quantiles of its
weights, mean, root mean square, bias) replaces the positional values, and a forward sweep from the input adds to
row ``c`` of layer ``l`` the sum ``sum_j W_l[c, j] V(unit_j) / sqrt(n)`` over the units of layer ``l - 1``, whose
embeddings already hold the sweep's message from below (one shared map at every depth). They are written as sets
too: the positional head's update is replaced by one small MLP applied at every connection, of ``W[c, j]``, features
of row ``c`` and features of input unit ``j``, plus a bias update per row and the bilinear per-connection update.
With ``set_rows`` the in-message from the layer above becomes a sweep from the read-out down (each layer's receiving
rows already hold the message from above, normalised), so with the forward sweep a unit's embedding describes both
what it computes and what the layers above make of it, at any depth. The first layer keeps its positional
rows (inputs are labelled, like classes), and so do convolutions and the dense layer after a flatten. A hidden
permutation then permutes the output exactly.

Conditioning: sinusoidal embeddings of ``t_source``, ``t_target`` and their gap, through an
MLP, modulate every layer norm (adaLN) and are added to the latents; an optional
``condition`` vector (B, condition_dim) joins them for later uses.

**Latent** (``latent_dim=k > 0``): a k-dimensional vector ``z`` per network shifts that
conditioning vector by ``latent_proj(z)`` at every step. ``forward`` uses the learned
``latent_mean`` unless it is given one ``z`` per batch element, so a generator with
``latent_mean = 0`` and no ``z`` is exactly the generator without the latent. It is the
action space of ``method=grpo method.algorithm=latent`` (:mod:`synthnet.methods.latent`):
a Gaussian policy over ``z`` whose mean is ``latent_mean``, so its log-probabilities are over
k dimensions rather than over every weight, and ``generate`` produces the policy's mean.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from synthnet.errors import SynthNetError
from synthnet.tokenization import KINDS, TokenLayout, detokenize


SET_QUANTILES = torch.linspace(0.0, 1.0, 9)  # order-free summary of a set row's weights
SET_EDGE_FEATURES, SET_EDGE_HIDDEN = 8, 32  # the per-connection MLP of set rows: features per side, hidden width
# columns of token_features: kind one-hot, depth, is_output, chunk position (8), log fan-in, log fan-out, valid share
NUM_TOKEN_FEATURES = len(KINDS) + 2 + 8 + 2 + 1
# the columns that say where a token sits inside its row (chunk position, share of valid slots)
POSITIONAL_FEATURES = torch.zeros(NUM_TOKEN_FEATURES, dtype=torch.bool)
POSITIONAL_FEATURES[len(KINDS) + 2:len(KINDS) + 10] = True
POSITIONAL_FEATURES[-1] = True


def sinusoidal_embedding(values: torch.Tensor, dim: int, max_period: float = 1000.0) -> torch.Tensor:
    """(B,) floats in [0, 1] -> (B, dim) sin/cos features at geometric frequencies."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=values.device, dtype=torch.float32) / half)
    args = values.float()[:, None] * freqs[None] * max_period / 4.0
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


class TimeConditioning(nn.Module):
    """(t_source, t_target[, condition]) -> conditioning vector (B, D)."""

    def __init__(self, *, d_model: int, time_dim: int = 64, condition_dim: int = 0):
        super().__init__()
        if time_dim % 2:
            raise SynthNetError(f"time_dim must be even (sine and cosine pairs), got {time_dim}")
        self.time_dim = time_dim
        self.condition_dim = condition_dim
        self.mlp = nn.Sequential(nn.Linear(3 * time_dim + condition_dim, d_model), nn.SiLU(),
                                 nn.Linear(d_model, d_model))

    def forward(self, t_source: torch.Tensor, t_target: torch.Tensor,
                condition: torch.Tensor | None = None) -> torch.Tensor:
        parts = [sinusoidal_embedding(t, self.time_dim) for t in (t_source, t_target, t_target - t_source)]
        if self.condition_dim:
            if condition is None:
                condition = torch.zeros(t_source.shape[0], self.condition_dim, device=t_source.device)
            parts.append(condition.float())
        return self.mlp(torch.cat(parts, dim=-1))


class AdaLayerNorm(nn.Module):
    """LayerNorm without affine parameters, scaled and shifted per sample by the condition."""

    def __init__(self, d_model: int):
        super().__init__()
        self.norm = nn.LayerNorm(d_model, elementwise_affine=False)
        self.modulation = nn.Linear(d_model, 2 * d_model)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:  # x (B, S, D), cond (B, D)
        scale, shift = self.modulation(F.silu(cond)).unsqueeze(1).chunk(2, dim=-1)
        return self.norm(x) * (1 + scale) + shift


class Attention(nn.Module):
    """Multi-head attention (cross or self) on ``F.scaled_dot_product_attention``."""

    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        if d_model % num_heads:
            raise SynthNetError(f"d_model {d_model} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """queries (B, S, D), context (B, T, D) -> (B, S, D)."""
        b, s, d = queries.shape
        h = self.num_heads
        q = self.q(queries).reshape(b, s, h, d // h).transpose(1, 2)
        k, v = self.kv(context).reshape(b, context.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, S, d/h)
        return self.out(out.transpose(1, 2).reshape(b, s, d))


class FeedForward(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MixtureOfExperts(nn.Module):
    """Top-k routed feed-forward experts with the Switch load-balancing loss and the router z-loss.

    Every expert runs on every forward, on its (possibly empty) slice of tokens, so all
    parameters take part in the graph and DDP's gradient reduction stays correct.
    """

    def __init__(self, *, d_model: int, hidden: int, num_experts: int, top_k: int):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise SynthNetError(f"moe top_k must be in 1..num_experts ({num_experts}), got {top_k}")
        self.num_experts, self.top_k = num_experts, top_k
        self.router = nn.Linear(d_model, num_experts)
        self.experts = nn.ModuleList(FeedForward(d_model, hidden) for _ in range(num_experts))
        self.last_balance_loss = torch.zeros(())
        self.last_z_loss = torch.zeros(())
        self.last_usage = torch.zeros(num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, S, D) -> (B, S, D)
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (T, D)
        logits = self.router(flat).float()  # (T, E)
        probs = logits.softmax(dim=-1)
        gate, chosen = probs.topk(self.top_k, dim=-1)  # (T, k)
        gate = gate / gate.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(flat)
        assigned = torch.zeros(self.num_experts, device=x.device)
        for e, expert in enumerate(self.experts):
            rows, slot = (chosen == e).nonzero(as_tuple=True)  # may be empty
            y = expert(flat[rows])  # runs even on an empty slice
            out = out.index_add(0, rows, (y * gate[rows, slot, None]).to(out.dtype))
            assigned[e] = rows.numel()
        fraction = assigned / max(flat.shape[0] * self.top_k, 1)  # share of routed slots
        self.last_balance_loss = self.num_experts * (fraction.detach() * probs.mean(dim=0)).sum()
        self.last_z_loss = torch.logsumexp(logits, dim=-1).pow(2).mean()
        self.last_usage = fraction.detach()
        return out.reshape(shape)


class LatentBlock(nn.Module):
    def __init__(self, *, d_model: int, num_heads: int, ff_hidden: int, num_experts: int, top_k: int):
        super().__init__()
        self.norm_attn = AdaLayerNorm(d_model)
        self.attn = Attention(d_model, num_heads)
        self.norm_ff = AdaLayerNorm(d_model)
        self.moe = (MixtureOfExperts(d_model=d_model, hidden=ff_hidden, num_experts=num_experts, top_k=top_k)
                    if num_experts > 1 else FeedForward(d_model, ff_hidden))

    def forward(self, latents: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.norm_attn(latents, cond)
        latents = latents + self.attn(h, h)
        return latents + self.moe(self.norm_ff(latents, cond))


def _layer_rows(values: torch.Tensor, layer) -> torch.Tensor:
    """Tokens of one layer (B, N, X) -> per-neuron rows (B, out_units, chunks, X)."""
    block = values[:, layer.first_token:layer.first_token + layer.num_tokens]
    return block.reshape(values.shape[0], layer.out_units, layer.chunks_per_row, values.shape[-1])


def scale_row_means(delta: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Scale the part of each neuron's weight update that all its incoming weights share (their mean) by
    ``1 / sqrt(fan_in)``; the rest, the bias and the padding pass unchanged. (B, N, C) -> (B, N, C).

    Moving every incoming weight of a neuron by the same amount shifts its pre-activation by that amount
    times the sum of its inputs, about ``sqrt(fan_in)`` times more than a random direction of the same size
    when the inputs are non-negative (after a ReLU). With a wide fan-in that one direction dominates: the
    PoC CNN's generator moved the second convolution's weights down together until every pre-activation
    was negative, and nothing below a dead layer receives a gradient again. Row operations only, so a
    hidden permutation still permutes the output exactly."""
    pieces = []
    for layer in layout.layers:
        rows = _layer_rows(delta, layer).flatten(2)  # (B, out_units, chunks * C)
        weights = rows[..., :layer.fan_in]
        shared = weights.mean(-1, keepdim=True) * (1.0 - 1.0 / math.sqrt(layer.fan_in))
        rows = torch.cat([weights - shared, rows[..., layer.fan_in:]], dim=-1)
        pieces.append(rows.reshape(delta.shape[0], layer.num_tokens, delta.shape[-1]))
    return torch.cat(pieces, dim=1)


def _connection(layout: TokenLayout, index: int) -> int | None:
    """Input columns per hidden neuron of layer index-1 feeding layer ``index``, or None."""
    if index == 0:
        return None
    layer, previous = layout.layers[index], layout.layers[index - 1]
    if layer.fan_in % previous.out_units:
        return None
    return layer.fan_in // previous.out_units


class PerceiverMoEGenerator(nn.Module):
    """Denoiser ``(tokens (B, N, C), t_source (B,), t_target (B,), layout) -> tokens (B, N, C)``."""

    def __init__(self, *, chunk_size: int, d_model: int = 64, num_latents: int = 32, num_blocks: int = 2,
                 num_heads: int = 4, ff_multiplier: int = 2, num_experts: int = 4, top_k: int = 2,
                 time_dim: int = 64, condition_dim: int = 0, predict: str = "delta", neuron_messages: bool = True,
                 message_rank: int = 32, max_output_units: int = 64, balance_loss_weight: float = 0.01,
                 z_loss_weight: float = 0.001, decoder_depth: int = 1, decoder_messages: bool = False,
                 probes: int = 0, probe_values: int = 1024, row_mean_scaling: bool = False,
                 latent_dim: int = 0, depth_feature: str = "relative", set_rows: bool = False):
        super().__init__()
        if int(decoder_depth) < 1:
            raise SynthNetError(f"generator.decoder_depth must be at least 1, got {decoder_depth}")
        if predict not in ("delta", "direct"):
            raise SynthNetError(f"generator.predict must be 'delta' or 'direct', got '{predict}'")
        if depth_feature not in ("relative", "role"):
            raise SynthNetError(f"generator.depth_feature must be 'relative' or 'role', got '{depth_feature}'")
        self.chunk_size, self.predict, self.depth_feature = chunk_size, predict, depth_feature
        self.row_mean_scaling = bool(row_mean_scaling)
        self.neuron_messages = neuron_messages
        self.set_rows = bool(set_rows)
        if self.set_rows and not neuron_messages:
            raise SynthNetError("generator.set_rows needs generator.neuron_messages: a set row's weights are written "
                                "by the per-connection update")
        self.balance_loss_weight, self.z_loss_weight = balance_loss_weight, z_loss_weight
        self.conditioning = TimeConditioning(d_model=d_model, time_dim=time_dim, condition_dim=condition_dim)
        self.latent_dim = int(latent_dim)
        if self.latent_dim:  # the policy's action space (module docstring): z -> a shift of the conditioning
            self.latent_proj = nn.Linear(self.latent_dim, d_model, bias=False)
            nn.init.normal_(self.latent_proj.weight, std=self.latent_dim ** -0.5)
            self.latent_mean = nn.Parameter(torch.zeros(self.latent_dim))
        self.value_embed = nn.Linear(2 * chunk_size, d_model)  # values and validity mask
        self.feature_embed = nn.Sequential(nn.Linear(NUM_TOKEN_FEATURES, d_model), nn.SiLU(), nn.Linear(d_model, d_model))
        self.max_output_units = max_output_units
        self.output_unit_embed = nn.Embedding(max_output_units, d_model)  # class identity of read-out rows
        self.query_norm = AdaLayerNorm(d_model)
        self.latents = nn.Parameter(torch.randn(num_latents, d_model) * 0.02)
        self.encode_norm = AdaLayerNorm(d_model)
        self.encode_attn = Attention(d_model, num_heads)
        self.encode_ff_norm = AdaLayerNorm(d_model)
        self.encode_ff = FeedForward(d_model, ff_multiplier * d_model)
        self.blocks = nn.ModuleList(
            LatentBlock(d_model=d_model, num_heads=num_heads, ff_hidden=ff_multiplier * d_model,
                        num_experts=num_experts, top_k=top_k) for _ in range(num_blocks))
        self.decode_norm = AdaLayerNorm(d_model)
        self.latent_norm = nn.LayerNorm(d_model)
        self.decode_attn = Attention(d_model, num_heads)
        self.decode_ff_norm = AdaLayerNorm(d_model)
        self.decode_ff = FeedForward(d_model, ff_multiplier * d_model)
        # further per-token feed-forward blocks (decoder_depth - 1): depth of the path from a token to its output
        self.decode_extra_norms = nn.ModuleList(AdaLayerNorm(d_model) for _ in range(int(decoder_depth) - 1))
        self.decode_extra_ffs = nn.ModuleList(FeedForward(d_model, ff_multiplier * d_model)
                                              for _ in range(int(decoder_depth) - 1))
        self.out_norm = AdaLayerNorm(d_model)
        self.head = nn.Linear(d_model, chunk_size)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        if neuron_messages:
            self.message_in = nn.Linear(d_model, d_model)
            self.message_value = nn.Linear(d_model, d_model)
            self.edge_row = nn.Linear(d_model, message_rank)
            self.edge_col = nn.Linear(d_model, message_rank)
            self.edge_gain = nn.Linear(d_model, 1)
            nn.init.zeros_(self.edge_row.weight)
            nn.init.zeros_(self.edge_row.bias)
            nn.init.zeros_(self.edge_gain.weight)
            nn.init.zeros_(self.edge_gain.bias)
        self.probes, self.probe_values = int(probes), int(probe_values)
        if self.probes:  # learned inputs the generated networks are run on; each neuron's responses describe it
            self.probe_inputs = nn.Parameter(torch.randn(self.probes, self.probe_values) * 0.5)
            self.probe_embed = nn.Sequential(nn.Linear(2 * self.probes + 1, d_model), nn.SiLU(),
                                             nn.Linear(d_model, d_model))
        self.decoder_messages = bool(decoder_messages and neuron_messages)
        if self.decoder_messages:  # a second, two-way round of messages on the decoded token features
            self.decoder_message = nn.ModuleDict({
                "backward_value": nn.Linear(d_model, d_model), "backward_out": nn.Linear(d_model, d_model),
                "forward_value": nn.Linear(d_model, d_model), "forward_out": nn.Linear(d_model, d_model)})
            self.decoder_message_norm = AdaLayerNorm(d_model)
            self.decoder_message_ff = FeedForward(d_model, ff_multiplier * d_model)
            for name in ("backward_out", "forward_out"):
                nn.init.zeros_(self.decoder_message[name].weight)
                nn.init.zeros_(self.decoder_message[name].bias)

        if self.set_rows:  # rows fed by hidden units, read and written as sets (module docstring)
            self.row_stats_embed = nn.Sequential(nn.Linear(len(SET_QUANTILES) + 3, d_model), nn.SiLU(),
                                                 nn.Linear(d_model, d_model))
            self.sweep_norm = nn.LayerNorm(d_model)
            self.sweep_value = nn.Linear(d_model, d_model)
            self.sweep_out = nn.Linear(d_model, d_model)
            self.back_norm = nn.LayerNorm(d_model)  # the backward messages become a sweep from the read-out down
            # per connection: MLP(W[c, j], row features of c, features of input unit j); a bias update per row
            self.set_row_head = nn.Linear(d_model, SET_EDGE_FEATURES + 1)
            self.set_col_head = nn.Linear(d_model, SET_EDGE_FEATURES)
            self.set_edge_hidden = nn.Linear(1, SET_EDGE_HIDDEN, bias=False)
            self.set_edge_row = nn.Linear(SET_EDGE_FEATURES, SET_EDGE_HIDDEN)
            self.set_edge_col = nn.Linear(SET_EDGE_FEATURES, SET_EDGE_HIDDEN, bias=False)
            self.set_edge_out = nn.Linear(SET_EDGE_HIDDEN, 1)
            for layer in (self.sweep_out, self.set_edge_out):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
            nn.init.zeros_(self.set_row_head.weight)
            nn.init.zeros_(self.set_row_head.bias)

    # ------------------------------------------------------------------ pieces

    def set_layers(self, layout: TokenLayout) -> list[bool]:
        """Per weight layer: is it read and written as a set of rows (``set_rows`` and its inputs are the units of
        the layer below one-to-one)? Convolutions and the dense layer after a flatten keep positional rows."""
        return [self.set_rows and _connection(layout, index) == 1 for index in range(len(layout.layers))]

    def _set_row_inputs(self, tokens: torch.Tensor, layout: TokenLayout, set_layers: list[bool]) -> torch.Tensor:
        """(B, N, D): for the tokens of set layers, an embedding of order-free statistics of their row (quantiles of
        its weights, their mean and root mean square, the bias), the same for every chunk of the row; zero on the
        tokens of other layers."""
        pieces = []
        for layer, is_set in zip(layout.layers, set_layers):
            if not is_set:
                pieces.append(tokens.new_zeros(tokens.shape[0], layer.num_tokens, self.row_stats_embed[-1].out_features))
                continue
            rows = _layer_rows(tokens, layer).flatten(2)  # (B, O, chunks * C)
            weights = rows[..., :layer.fan_in]
            bias = rows[..., layer.bias_slot] if layer.bias is not None else rows.new_zeros(rows.shape[:2])
            quantiles = torch.quantile(weights, SET_QUANTILES.to(weights), dim=-1).permute(1, 2, 0)  # (B, O, Q)
            stats = torch.cat([quantiles, weights.mean(-1, keepdim=True),
                               weights.pow(2).mean(-1, keepdim=True).add(1e-12).sqrt(), bias[..., None]], dim=-1)
            embedded = self.row_stats_embed(stats)  # (B, O, D)
            pieces.append(embedded[:, :, None].expand(-1, -1, layer.chunks_per_row, -1).flatten(1, 2))
        return torch.cat(pieces, dim=1)

    def _forward_sweep(self, h: torch.Tensor, tokens: torch.Tensor, layout: TokenLayout,
                       set_layers: list[bool]) -> torch.Tensor:
        """Layer by layer from the input: each set row c of layer l adds ``sum_j W_l[c, j] V(norm(unit_j)) / sqrt(n)``
        over the units j of layer l - 1, whose embeddings already hold this sweep's message from below, so a row
        learns what its inputs compute at any depth with one shared map."""
        pieces = [_layer_rows(h, layer) for layer in layout.layers]  # (B, O, K, D) each
        for index, (layer, is_set) in enumerate(zip(layout.layers, set_layers)):
            if not is_set:
                continue
            previous = layout.layers[index - 1]
            units = self.sweep_value(self.sweep_norm(pieces[index - 1].mean(2)))  # (B, O_prev, D)
            weights = _layer_rows(tokens, layer).flatten(2)[..., :previous.out_units]  # (B, O, O_prev)
            message = torch.einsum("bcj,bjd->bcd", weights, units) / math.sqrt(previous.out_units)
            pieces[index] = pieces[index] + self.sweep_out(message)[:, :, None]
        return torch.cat([piece.flatten(1, 2) for piece in pieces], dim=1)

    def _set_row_update(self, out: torch.Tensor, e: torch.Tensor, tokens: torch.Tensor, layout: TokenLayout,
                        set_layers: list[bool]) -> torch.Tensor:
        """Replace the positional head's update on set layers by ``MLP(W[c, j], r_c, s_j)`` on the weights (r from
        row c's features, s from input unit j's) and ``d_c`` on the bias: the same function at every connection, so a
        hidden permutation permutes it exactly and a wider layer is only more of the same."""
        pieces = []
        for index, (layer, is_set) in enumerate(zip(layout.layers, set_layers)):
            block = out[:, layer.first_token:layer.first_token + layer.num_tokens]
            if is_set:
                rows = _layer_rows(tokens, layer).flatten(2)  # (B, O, chunks * C)
                row_features, bias = self.set_row_head(_layer_rows(e, layer).mean(2)).split(
                    [SET_EDGE_FEATURES, 1], dim=-1)  # (B, O, k), (B, O, 1)
                columns = self.set_col_head(_layer_rows(e, layout.layers[index - 1]).mean(2))  # (B, O_prev, k)
                weights = rows[..., :layer.fan_in]  # (B, O, O_prev)
                hidden = (self.set_edge_hidden(weights[..., None]) + self.set_edge_row(row_features)[:, :, None]
                          + self.set_edge_col(columns)[:, None])  # (B, O, O_prev, H)
                update = torch.zeros_like(rows)
                update[..., :layer.fan_in] = self.set_edge_out(F.silu(hidden))[..., 0]
                if layer.bias is not None:
                    update[..., layer.bias_slot] = bias[..., 0]
                block = update.reshape(block.shape)
            pieces.append(block)
        return torch.cat(pieces, dim=1)

    def token_features(self, layout: TokenLayout) -> torch.Tensor:
        """(N, F) structural features of every token (no neuron index)."""
        kind = F.one_hot(layout.kind, len(KINDS)).float()
        position = sinusoidal_embedding(layout.chunk_index.float() / 64.0, 8)
        valid = layout.mask.float().mean(-1, keepdim=True)
        depth = layout.depth
        if self.depth_feature == "role":  # first layer 0, read-out 1, every layer between 0.5
            depth = torch.where((depth > 0) & (depth < 1), torch.full_like(depth, 0.5), depth)
        return torch.cat([kind, depth[:, None], layout.is_output.float()[:, None], position,
                          layout.log_fan_in[:, None] / 8.0, layout.log_fan_out[:, None] / 8.0, valid], dim=-1)

    def output_embedding(self, layout: TokenLayout) -> torch.Tensor:
        """(N, D): a learned embedding of the class index on read-out tokens, zero elsewhere. Read-out
        units are labelled (class c is not interchangeable with class c'), unlike hidden units."""
        output_units = layout.layers[-1].out_units
        if output_units > self.max_output_units:
            raise SynthNetError(f"the target has {output_units} output units; this generator handles at most "
                                f"{self.max_output_units} (generator.max_output_units)")
        index = layout.neuron_index.clamp(max=self.max_output_units - 1)
        return self.output_unit_embed(index) * layout.is_output[:, None].to(self.output_unit_embed.weight.dtype)

    def _probe_features(self, tokens: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """(B, N, D): every neuron's responses to the learned probe inputs, embedded and added to its tokens.

        The networks the tokens describe are run (batched, differentiably) on the probes; each weight layer's
        pre-activation output of neuron j, averaged and maxed over positions, is that neuron's description of
        what it computes, which its incoming weights alone cannot give beyond the first layer. Normalised per
        network and layer (the log of the scale is one more feature). A hidden permutation permutes the
        responses with the neurons, so the features follow the symmetry exactly."""
        from synthnet.evaluation.scoring import batched_forward

        network = layout.network
        if network is None or not hasattr(network, "input_shape"):
            raise SynthNetError("this generator uses probes (generator.probes > 0) and needs the target network in "
                                "the token layout (build it with synthnet.generation.target_layout)")
        numel = math.prod(network.input_shape)
        if numel > self.probe_values:
            raise SynthNetError(f"the target's input has {numel} values; this generator's probes hold "
                                f"{self.probe_values} (generator.probe_values)")
        probes = self.probe_inputs[:, :numel].reshape(self.probes, *network.input_shape)
        outputs = batched_forward(network, detokenize(tokens, layout), probes, every_layer=True)  # per layer
        # (B, P, units, *positions)
        pieces = []
        for layer, out in zip(layout.layers, outputs):
            out = out.flatten(3) if out.dim() > 3 else out[..., None]  # (B, P, U, S)
            feats = torch.cat([out.mean(-1), out.amax(-1)], dim=1)  # (B, 2P, U)
            scale = feats.pow(2).mean(dim=(1, 2), keepdim=True).add(1e-12).sqrt()  # (B, 1, 1)
            feats = torch.cat([feats / scale, scale.log().expand(-1, 1, feats.shape[-1])], dim=1)
            embedded = self.probe_embed(feats.transpose(1, 2))  # (B, U, D)
            pieces.append(embedded[:, :, None].expand(-1, -1, layer.chunks_per_row, -1).flatten(1, 2))
        return torch.cat(pieces, dim=1)

    def _messages_in(self, h: torch.Tensor, tokens: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """Add to every hidden neuron's tokens its outgoing weights, weighted by receiving-row embeddings. With
        ``set_rows`` it is a sweep from the read-out down: the receiving rows' embeddings (normalised) already hold
        the messages from above, as a gradient carries the loss down through every layer."""
        pieces = [_layer_rows(h, layer) for layer in layout.layers]  # (B, O, K, D) each
        for index in reversed(range(len(layout.layers) - 1)):
            repeat = _connection(layout, index + 1)
            if not repeat:
                continue
            layer, nxt = layout.layers[index], layout.layers[index + 1]
            weights = _layer_rows(tokens, nxt).flatten(2)[..., :layer.out_units * repeat]  # (B, O', O*rep)
            weights = weights.reshape(*weights.shape[:2], layer.out_units, repeat).mean(-1)  # (B, O', O)
            receivers = pieces[index + 1].mean(2) if self.set_rows else _layer_rows(h, nxt).mean(2)
            receivers = self.message_value(self.back_norm(receivers) if self.set_rows else receivers)  # (B, O', D)
            message = torch.einsum("bcj,bcd->bjd", weights, receivers) / math.sqrt(nxt.out_units)
            pieces[index] = pieces[index] + self.message_in(message)[:, :, None]
        return torch.cat([piece.flatten(1, 2) for piece in pieces], dim=1)

    def _two_way_messages(self, e: torch.Tensor, tokens: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """Messages along real connections in both directions, on features e (B, N, D) -> update (B, N, D).

        Backward: hidden neuron j of layer l gets ``sum_c W_{l+1}[c, j] V(row_c)`` (who reads me, how strongly);
        forward: row c of layer l+1 gets ``sum_j W_{l+1}[c, j] U(neuron_j)`` (what my inputs compute). Both are
        sums over neurons, so a hidden permutation permutes them exactly."""
        m = self.decoder_message
        neurons = [_layer_rows(e, layer).mean(2) for layer in layout.layers]  # (B, O, D) each
        updates = [torch.zeros_like(n) for n in neurons]
        for index in range(1, len(layout.layers)):
            repeat = _connection(layout, index)
            if repeat is None:
                continue
            layer, previous = layout.layers[index], layout.layers[index - 1]
            weights = _layer_rows(tokens, layer).flatten(2)[..., :previous.out_units * repeat]  # (B, O, O_prev*rep)
            weights = weights.reshape(*weights.shape[:2], previous.out_units, repeat).mean(-1)  # (B, O, O_prev)
            backward = torch.einsum("bcj,bcd->bjd", weights, m["backward_value"](neurons[index]))
            updates[index - 1] = updates[index - 1] + m["backward_out"](backward / math.sqrt(layer.out_units))
            forward = torch.einsum("bcj,bjd->bcd", weights, m["forward_value"](neurons[index - 1]))
            updates[index] = updates[index] + m["forward_out"](forward / math.sqrt(previous.out_units))
        pieces = [update[:, :, None].expand(-1, -1, layer.chunks_per_row, -1).flatten(1, 2)
                  for update, layer in zip(updates, layout.layers)]
        return torch.cat(pieces, dim=1)

    def _edge_update(self, e: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """Bilinear per-connection update <P(row_c), Q(neuron_j)> laid out as tokens (B, N, C)."""
        b = e.shape[0]
        neurons = [_layer_rows(e, layer).mean(2) for layer in layout.layers]  # (B, O, D) each
        pieces = []
        for index, layer in enumerate(layout.layers):
            width = layer.chunks_per_row * layout.chunk_size
            repeat = _connection(layout, index)
            if repeat is None:
                pieces.append(e.new_zeros(b, layer.num_tokens, layout.chunk_size))
                continue
            rows = self.edge_row(neurons[index])  # (B, O, r)
            cols = self.edge_col(neurons[index - 1])  # (B, O_prev, r)
            update = torch.einsum("bcr,bjr->bcj", rows, cols) / math.sqrt(rows.shape[-1])
            update = update * (1 + self.edge_gain(neurons[index]))  # (B, O, O_prev)
            update = update.repeat_interleave(repeat, dim=-1)
            update = F.pad(update, (0, width - update.shape[-1]))
            pieces.append(update.reshape(b, layer.num_tokens, layout.chunk_size))
        return torch.cat(pieces, dim=1)

    # ------------------------------------------------------------------ forward

    def forward(self, tokens: torch.Tensor, t_source: torch.Tensor, t_target: torch.Tensor, layout: TokenLayout,
                condition: torch.Tensor | None = None, latent: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, N, C), t_source / t_target (B,) -> predicted tokens at t_target (B, N, C); ``latent``
        (B, latent_dim) replaces ``latent_mean`` (generators with ``latent_dim > 0`` only)."""
        if tokens.shape[-2:] != (layout.num_tokens, self.chunk_size):
            raise SynthNetError(f"generator expects tokens (*, {layout.num_tokens}, {self.chunk_size}), "
                                f"got {tuple(tokens.shape)}")
        layout = layout.to(tokens.device) if layout.mask.device != tokens.device else layout
        b = tokens.shape[0]
        mask = layout.mask.to(tokens.dtype)
        cond = self.conditioning(t_source, t_target, condition)  # (B, D)
        if latent is not None and (not self.latent_dim or latent.shape != (b, self.latent_dim)):
            raise SynthNetError(f"generator expects a latent of shape ({b}, {self.latent_dim}), got "
                                f"{tuple(latent.shape)}" + ("" if self.latent_dim else " (it has latent_dim 0)"))
        if self.latent_dim:
            z = self.latent_mean.expand(b, -1) if latent is None else latent.to(cond.dtype)
            cond = cond + self.latent_proj(z)
        values = torch.cat([tokens * mask, mask.expand(b, -1, -1)], dim=-1)
        features = self.token_features(layout)
        set_layers = self.set_layers(layout)
        if any(set_layers):  # set rows: no value in a fixed slot, no chunk position, no share of valid slots
            is_set = torch.cat([torch.full((layer.num_tokens,), flag, device=tokens.device)
                                for layer, flag in zip(layout.layers, set_layers)])
            values = values * (~is_set)[None, :, None]
            features = features.masked_fill(is_set[:, None] & POSITIONAL_FEATURES.to(features.device)[None], 0.0)
        h = self.value_embed(values) + self.feature_embed(features)[None]  # (B, N, D)
        if any(set_layers):
            h = h + self._set_row_inputs(tokens * mask, layout, set_layers)
        h = h + self.output_embedding(layout)[None]
        if self.probes:
            h = h + self._probe_features(tokens * mask, layout)
        if any(set_layers):  # what each unit computes (from the input up), then what it should do (from the top)
            h = self._forward_sweep(h, tokens * mask, layout, set_layers)
        if self.neuron_messages:
            h = self._messages_in(h, tokens * mask, layout)
        queries = self.query_norm(h, cond)
        latents = self.latents[None].expand(b, -1, -1) + cond[:, None]
        latents = latents + self.encode_attn(self.encode_norm(latents, cond), queries)
        latents = latents + self.encode_ff(self.encode_ff_norm(latents, cond))
        for block in self.blocks:
            latents = block(latents, cond)
        e = h + self.decode_attn(self.decode_norm(h, cond), self.latent_norm(latents))
        e = e + self.decode_ff(self.decode_ff_norm(e, cond))
        for norm, ff in zip(self.decode_extra_norms, self.decode_extra_ffs):
            e = e + ff(norm(e, cond))
        if self.decoder_messages:
            e = e + self._two_way_messages(e, tokens * mask, layout)
            e = e + self.decoder_message_ff(self.decoder_message_norm(e, cond))
        e = self.out_norm(e, cond)
        out = self.head(e)
        if any(set_layers):
            out = self._set_row_update(out, e, tokens * mask, layout, set_layers)
            if self.predict == "direct":
                out = torch.where(is_set[None, :, None], out + tokens, out)
        if self.neuron_messages:
            out = out + self._edge_update(e, layout)
        if self.row_mean_scaling:
            delta = out if self.predict == "delta" else out - tokens
            delta = scale_row_means(delta * mask, layout)
            out = delta if self.predict == "delta" else tokens + delta
        if self.predict == "delta":
            out = tokens + out
        return out * mask

    def moe_layers(self) -> list[MixtureOfExperts]:
        return [block.moe for block in self.blocks if isinstance(block.moe, MixtureOfExperts)]

    def auxiliary_loss(self) -> torch.Tensor:
        """Weighted load-balancing + router z-loss of the last forward (a scalar)."""
        layers = self.moe_layers()
        if not layers:
            return self.latents.new_zeros(())
        balance = sum(m.last_balance_loss for m in layers) / len(layers)
        z = sum(m.last_z_loss for m in layers) / len(layers)
        return self.balance_loss_weight * balance + self.z_loss_weight * z

    def expert_usage(self) -> dict[str, Any] | None:
        """Share of routed token slots per expert and block in the last forward, and the raw aux losses."""
        layers = self.moe_layers()
        if not layers:
            return None
        return {"fraction": [[round(float(v), 4) for v in m.last_usage] for m in layers],
                "balance_loss": float(sum(float(m.last_balance_loss.detach()) for m in layers) / len(layers)),
                "z_loss": float(sum(float(m.last_z_loss.detach()) for m in layers) / len(layers))}
