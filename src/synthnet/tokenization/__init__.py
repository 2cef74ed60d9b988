"""Structure-aware, lossless tokenisation of a target's weights.

Design: **one token per output neuron / channel, chunked.** For every weight layer of
the target's chain (see :class:`synthnet.targets.LayerSpec`) the row of output unit ``j``
is its incoming weights, flattened (``in_features * kernel``), followed by its bias; the
row is split into fixed-size chunks (``chunk_size`` values, the last zero-padded and
masked). Each chunk is one token. Why this design:

* **Unseen widths and depths.** A wider layer just has more tokens of the same kind; a
  deeper net has more layers. Token features describe each token by what it is (layer
  index, relative depth, tensor kind, chunk position, fan-in / fan-out), never by an
  absolute position in a flat vector, so one generator can read any size of network.
* **Permutation symmetry.** Permuting the hidden units of layer ``l`` permutes the tokens
  of layer ``l`` (whole rows move) and permutes the *values inside* the tokens of layer
  ``l + 1`` (their columns move). The neuron index is kept in the layout for the exact
  inverse but is deliberately *not* a token feature, so a generator that treats tokens as
  a set (the Perceiver IO with ``neuron_messages`` off) is exactly equivariant to the first
  half; the second half is handled by the Perceiver's neuron messages (which follow the
  real connections), permutation augmentation in training and neuron alignment in
  evaluation. ``tests/test_generators.py`` pins down both behaviours.
* **Large fan-in.** The PoC CNN's 3136-wide dense layer becomes 128 rows of 50 chunks
  rather than 128 tokens of width 3137; attention cost stays linear in tokens for the
  Perceiver's cross-attention.

**Scale normalisation.** Each layer is divided by a per-layer scale recorded in the
layout: by default ``2 ** round(log2(1 / sqrt(fan_in)))``, the power of two nearest the
PyTorch default initialiser's bound, which makes every layer O(1) at init and at the end
of training. Powers of two make the division and its inverse exact in floating point, so
``detokenize(tokenize(sd)) == sd`` bit for bit. Explicit per-layer scales (for example the
zoo's measured standard deviations, rounded the same way) can be passed in instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from synthnet.errors import SynthNetError
from synthnet.targets import LayerSpec

KINDS = {"linear": 0, "conv1d": 1, "conv2d": 2}


def power_of_two(value: float) -> float:
    """The power of two nearest ``value`` in log scale (exact to multiply and divide by)."""
    if not value > 0 or not math.isfinite(value):
        raise SynthNetError(f"scale must be positive and finite, got {value}")
    return float(2.0 ** round(math.log2(value)))


@dataclass(frozen=True)
class LayerLayout:
    weight: str
    bias: str | None
    kind: str
    weight_shape: tuple[int, ...]  # (out, in, *kernel)
    row_length: int  # in * prod(kernel) + (1 if bias)
    chunks_per_row: int
    scale: float  # power of two
    first_token: int
    bias_slot: int = -1  # where the bias sits in the flattened row: right after the weights, or a chunk's start

    @property
    def fan_in(self) -> int:
        return self.row_length - (1 if self.bias is not None else 0)

    @property
    def out_units(self) -> int:
        return self.weight_shape[0]

    @property
    def num_tokens(self) -> int:
        return self.out_units * self.chunks_per_row


@dataclass(frozen=True)
class TokenLayout:
    """Where every token came from, and the features a generator may see.

    Per-token tensors have shape (tokens,); ``mask`` has shape (tokens, chunk_size).
    """

    chunk_size: int
    layers: tuple[LayerLayout, ...]
    layer_index: torch.Tensor  # (tokens,) int64
    depth: torch.Tensor  # (tokens,) float32, layer index / (layers - 1)
    kind: torch.Tensor  # (tokens,) int64, KINDS id
    is_output: torch.Tensor  # (tokens,) int64, 1 for the read-out layer
    chunk_index: torch.Tensor  # (tokens,) int64, position of the chunk in its row
    log_fan_in: torch.Tensor  # (tokens,) float32
    log_fan_out: torch.Tensor  # (tokens,) float32
    neuron_index: torch.Tensor  # (tokens,) int64; for the inverse only, not a generator feature
    mask: torch.Tensor = field(repr=False)  # (tokens, chunk_size) bool, True on real values
    # the target module these tokens describe (a template: its own weights are never used), for generators that run
    # the networks they generate on learned probe inputs; None where a layout was built without one
    network: Any = field(default=None, repr=False, compare=False)

    @property
    def num_tokens(self) -> int:
        return int(self.layer_index.shape[0])

    @property
    def num_values(self) -> int:
        return int(self.mask.sum())

    def signature(self) -> tuple:
        """Identifies the architecture: equal signatures mean interchangeable token tensors."""
        return tuple((l.weight, l.weight_shape, l.bias is not None, l.chunks_per_row, l.scale) for l in self.layers)

    def to(self, device) -> "TokenLayout":
        moved = {name: getattr(self, name).to(device) for name in
                 ("layer_index", "depth", "kind", "is_output", "chunk_index", "log_fan_in", "log_fan_out",
                  "neuron_index", "mask")}
        return TokenLayout(self.chunk_size, self.layers, **moved, network=self.network)

    def state_dict_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {}
        for layer in self.layers:
            shapes[layer.weight] = layer.weight_shape
            if layer.bias is not None:
                shapes[layer.bias] = (layer.out_units,)
        return shapes


def build_layout(specs: Sequence[LayerSpec], state_dict: Mapping[str, torch.Tensor], chunk_size: int = 64,
                 scales: Mapping[str, float] | None = None, network: Any = None,
                 bias_chunk: bool = False) -> TokenLayout:
    """Layout for a target with ``specs`` whose tensors have the shapes in ``state_dict``.

    ``scales`` maps weight names to per-layer scales (rounded to powers of two); missing
    entries use the fan-in default described in the module docstring. ``network`` is the target
    module itself, kept for generators that probe the networks they generate. ``bias_chunk`` puts each
    bias at the start of a chunk of its own instead of right after the weights, so its slot does not move
    when the fan-in changes (not the default yet: every stored generator was trained on the packed rows).
    """
    if chunk_size <= 0:
        raise SynthNetError(f"chunk_size must be positive, got {chunk_size}")
    expected = {s.weight for s in specs} | {s.bias for s in specs if s.bias}
    extra = sorted(set(state_dict) - expected)
    if extra:
        raise SynthNetError(f"tensor '{extra[0]}' is not part of the target's layer chain")
    layers, per_token = [], {k: [] for k in ("layer_index", "depth", "kind", "is_output", "chunk_index",
                                              "log_fan_in", "log_fan_out", "neuron_index")}
    masks, first = [], 0
    count = len(specs)
    for index, spec in enumerate(specs):
        if spec.weight not in state_dict:
            raise SynthNetError(f"tensor '{spec.weight}' missing")
        shape = tuple(int(s) for s in state_dict[spec.weight].shape)
        fan_in = int(math.prod(shape[1:]))
        row = fan_in + (1 if spec.bias else 0)
        own = bool(bias_chunk and spec.bias)
        chunks = math.ceil(fan_in / chunk_size) + 1 if own else math.ceil(row / chunk_size)
        scale = power_of_two(float(scales[spec.weight]) if scales and spec.weight in scales else 1 / math.sqrt(fan_in))
        slot = (chunks - 1) * chunk_size if own else fan_in
        layer = LayerLayout(spec.weight, spec.bias, spec.kind, shape, row, chunks, scale, first, slot)
        layers.append(layer)
        n = layer.num_tokens
        per_token["layer_index"].append(torch.full((n,), index))
        per_token["depth"].append(torch.full((n,), index / max(count - 1, 1)))
        per_token["kind"].append(torch.full((n,), KINDS[spec.kind]))
        per_token["is_output"].append(torch.full((n,), int(index == count - 1)))
        per_token["chunk_index"].append(torch.arange(chunks).repeat(shape[0]))
        per_token["log_fan_in"].append(torch.full((n,), math.log(fan_in)))
        per_token["log_fan_out"].append(torch.full((n,), math.log(shape[0])))
        per_token["neuron_index"].append(torch.arange(shape[0]).repeat_interleave(chunks))
        valid = torch.zeros(shape[0], chunks * chunk_size, dtype=torch.bool)
        valid[:, :fan_in] = True
        if spec.bias:
            valid[:, slot] = True
        masks.append(valid.reshape(n, chunk_size))
        first += n
    floats = {"depth", "log_fan_in", "log_fan_out"}
    tensors = {k: torch.cat(v).to(torch.float32 if k in floats else torch.int64) for k, v in per_token.items()}
    return TokenLayout(chunk_size, tuple(layers), mask=torch.cat(masks), network=network, **tensors)


def tokenize(state_dict: Mapping[str, torch.Tensor], layout: TokenLayout) -> torch.Tensor:
    """state dict -> normalised tokens (tokens, chunk_size); tensors may carry a leading batch
    dimension (batch, *shape), giving (batch, tokens, chunk_size). Padding is zero."""
    pieces = []
    for layer in layout.layers:
        weight = state_dict[layer.weight]
        batch_shape = weight.shape[:weight.dim() - len(layer.weight_shape)]
        if tuple(weight.shape[len(batch_shape):]) != layer.weight_shape:
            raise SynthNetError(f"tensor '{layer.weight}' has shape {tuple(weight.shape)}, "
                                f"the layout expects {layer.weight_shape}")
        row = weight.reshape(*batch_shape, layer.out_units, -1)
        if layer.bias is not None:
            gap = layer.bias_slot - layer.fan_in  # 0 when the bias follows the weights
            row = torch.nn.functional.pad(row, (0, gap))
            row = torch.cat([row, state_dict[layer.bias].reshape(*batch_shape, layer.out_units, 1)], dim=-1)
        pad = layer.chunks_per_row * layout.chunk_size - row.shape[-1]
        row = torch.nn.functional.pad(row / layer.scale, (0, pad))
        pieces.append(row.reshape(*batch_shape, layer.num_tokens, layout.chunk_size))
    return torch.cat(pieces, dim=-2)


def detokenize(tokens: torch.Tensor, layout: TokenLayout) -> dict[str, torch.Tensor]:
    """Exact inverse of :func:`tokenize`: (…, tokens, chunk_size) -> state dict (…, *shape)."""
    if tokens.shape[-2:] != (layout.num_tokens, layout.chunk_size):
        raise SynthNetError(f"tokens of shape {tuple(tokens.shape)} do not fit a layout of "
                            f"{layout.num_tokens} x {layout.chunk_size}")
    batch_shape = tokens.shape[:-2]
    out = {}
    for layer in layout.layers:
        block = tokens[..., layer.first_token:layer.first_token + layer.num_tokens, :]
        rows = block.reshape(*batch_shape, layer.out_units, -1) * layer.scale
        out[layer.weight] = rows[..., :layer.fan_in].reshape(*batch_shape, *layer.weight_shape).contiguous()
        if layer.bias is not None:
            out[layer.bias] = rows[..., layer.bias_slot].contiguous()
    return out


def token_permutation(layout: TokenLayout, perms: Sequence[torch.Tensor]) -> torch.Tensor:
    """Token order induced by permuting the output units of layers 0..len(perms)-1 (whole rows).

    Returns an index of shape (tokens,) such that ``tokens[index]`` moves the rows the way
    :func:`synthnet.targets.permute_hidden` moves them (it does not touch values inside rows).
    """
    index = torch.arange(layout.num_tokens)
    for layer, perm in zip(layout.layers, perms):
        rows = index[layer.first_token:layer.first_token + layer.num_tokens].reshape(layer.out_units, -1)
        index[layer.first_token:layer.first_token + layer.num_tokens] = rows[perm].reshape(-1)
    return index
