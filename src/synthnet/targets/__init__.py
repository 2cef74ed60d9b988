"""Targets: the architectures whose weights SynthNet synthesizes, kept apart from tasks.

A target is an ordinary ``torch.nn.Module`` built from its config and the task's input
shape. Every target is a chain of weight layers (linear or convolution) and describes that
chain with :class:`LayerSpec` entries; the chain is all the rest of SynthNet needs to know:
tokenisation, permutation of hidden neurons (augmentation, symmetry tests) and neuron
alignment (evaluation) are written once against it.

A new target is one entry in :data:`TARGETS`: its options class (defaults, help and ranges, which the
config schema ``configs/schema.py`` reads) and its builder.
"""

from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from synthnet.errors import SynthNetError
from synthnet.options import build_options, check_options, option


@dataclass(frozen=True)
class LayerSpec:
    """One weight layer of a target's chain.

    ``weight`` has shape (out_units, in_features, *kernel); ``bias`` (out_units,).
    ``in_repeat`` is how many input columns belong to each unit of the previous layer:
    1 normally, H*W for the first linear layer after flattening C channels of H x W
    (channel-major, as ``torch.flatten`` lays them out).
    """

    weight: str
    bias: str | None
    kind: str  # "linear" | "conv1d" | "conv2d"
    in_repeat: int = 1


_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "silu": nn.SiLU, "sigmoid": nn.Sigmoid}


def activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise SynthNetError(f"unknown activation '{name}'; available: {', '.join(sorted(_ACTIVATIONS))}")
    return _ACTIVATIONS[name]()


class MLP(nn.Module):
    """Flatten, then ``len(hidden)`` hidden linear layers with an activation, then a linear read-out."""

    def __init__(self, *, input_shape: Sequence[int], num_classes: int, hidden: Sequence[int],
                 activation_name: str = "relu"):
        super().__init__()
        widths = [math.prod(int(s) for s in input_shape)] + [int(h) for h in hidden] + [num_classes]
        if any(w <= 0 for w in widths):
            raise SynthNetError(f"mlp widths must be positive, got hidden={list(hidden)}")
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.act = activation(activation_name)
        self.input_shape = tuple(int(s) for s in input_shape)

    def forward(self, x: torch.Tensor, every_layer: bool = False):
        """(batch, *input_shape) -> logits (batch, classes); with ``every_layer``, the list of every weight
        layer's pre-activation output (batch, units), in :meth:`layer_specs` order (the last is the logits)."""
        x = x.flatten(1)
        outputs = []
        for i, layer in enumerate(self.layers):
            x = layer(x)
            outputs.append(x)
            if i < len(self.layers) - 1:
                x = self.act(x)
        return outputs if every_layer else x

    def layer_specs(self) -> list[LayerSpec]:
        return [LayerSpec(f"layers.{i}.weight", f"layers.{i}.bias", "linear") for i in range(len(self.layers))]


class CNN(nn.Module):
    """Convolutions (1-D or 2-D, by the input's rank) with activation and optional max-pooling,
    then flatten and fully connected layers. Input (batch, channels, *spatial)."""

    def __init__(self, *, input_shape: Sequence[int], num_classes: int, channels: Sequence[int],
                 kernel_size: int | Sequence[int] = 3, stride: int = 1, padding: int | None = None, pool: int = 2,
                 fc: Sequence[int] = (), activation_name: str = "relu", dims: int | None = None):
        super().__init__()
        rank = len(input_shape) - 1
        if rank not in (1, 2):
            raise SynthNetError(f"cnn needs 1-D signals or 2-D images, got input shape {tuple(input_shape)}")
        if dims is not None and int(dims) != rank:
            raise SynthNetError(f"cnn with dims={dims} cannot run on a {rank}-D task (input shape {tuple(input_shape)})")
        self.rank = rank
        self.input_shape = tuple(int(s) for s in input_shape)
        conv = nn.Conv1d if rank == 1 else nn.Conv2d
        pool_layer = nn.MaxPool1d if rank == 1 else nn.MaxPool2d
        kernels = [int(kernel_size)] * len(channels) if isinstance(kernel_size, int) else [int(k) for k in kernel_size]
        if len(kernels) != len(channels):
            raise SynthNetError(f"cnn kernel_size needs one entry per conv layer ({len(channels)}), got {kernels}")
        in_channels = int(input_shape[0])
        self.convs = nn.ModuleList()
        for out_channels, kernel in zip(channels, kernels):
            pad = kernel // 2 if padding is None else int(padding)
            self.convs.append(conv(in_channels, int(out_channels), kernel, stride=stride, padding=pad))
            in_channels = int(out_channels)
        self.pool = pool_layer(pool) if pool and pool > 1 else nn.Identity()
        self.act = activation(activation_name)
        with torch.no_grad():
            features = self._features(torch.zeros(1, *input_shape))
        if features.numel() == 0 or min(features.shape[2:]) < 1:
            raise SynthNetError(f"cnn layers shrink input {tuple(input_shape)} to nothing")
        self.feature_shape = tuple(features.shape[1:])
        widths = [features[0].numel()] + [int(w) for w in fc] + [num_classes]
        self.fcs = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))

    def _features(self, x: torch.Tensor, outputs: list | None = None) -> torch.Tensor:
        for layer in self.convs:
            x = layer(x)
            if outputs is not None:
                outputs.append(x)
            x = self.pool(self.act(x))
        return x

    def forward(self, x: torch.Tensor, every_layer: bool = False):
        """(batch, *input_shape) -> logits (batch, classes); with ``every_layer``, the list of every weight
        layer's pre-activation output ((batch, channels, *spatial) for convolutions, (batch, units) after), in
        :meth:`layer_specs` order (the last is the logits)."""
        outputs: list = []
        x = self._features(x, outputs).flatten(1)
        for i, layer in enumerate(self.fcs):
            x = layer(x)
            outputs.append(x)
            if i < len(self.fcs) - 1:
                x = self.act(x)
        return outputs if every_layer else x

    def layer_specs(self) -> list[LayerSpec]:
        kind = f"conv{self.rank}d"
        specs = [LayerSpec(f"convs.{i}.weight", f"convs.{i}.bias", kind) for i in range(len(self.convs))]
        spatial = int(torch.tensor(self.feature_shape[1:]).prod())
        for i in range(len(self.fcs)):
            specs.append(LayerSpec(f"fcs.{i}.weight", f"fcs.{i}.bias", "linear",
                                   in_repeat=spatial if i == 0 and self.convs else 1))
        return specs


MAX_WIDTH = 1 << 16  # widest layer a config may ask for


@dataclass(frozen=True)
class MLPOptions:
    """``target=mlp``: flatten, hidden linear layers with an activation, linear read-out."""

    hidden: list[int] = option([32], "hidden widths, one entry per hidden layer", low=1, high=MAX_WIDTH, each=True)
    activation: str = option("relu", "relu | tanh | gelu | silu | sigmoid", choices=tuple(_ACTIVATIONS))

    def __post_init__(self):
        check_options(self, "target.")


@dataclass(frozen=True)
class CNNOptions:
    """``target=cnn``: convolutions for 2-D images or 1-D signals (from the task's input shape), then a
    fully connected head."""

    channels: list[int] = option([16, 32], "output channels of each convolution", low=1, high=MAX_WIDTH, each=True)
    kernel_size: Any = option(3, "one size for all convolutions, or a list with one per layer", low=1, high=64,
                              each=True)
    stride: int = option(1, "convolution stride", low=1, high=64)
    padding: int | None = option(None, "null = kernel_size // 2", low=0, high=64)
    pool: int = option(2, "max-pool size after each convolution; 0 or 1 = none", low=0, high=64)
    fc: list[int] = option([64], "hidden widths of the fully connected head", low=1, high=MAX_WIDTH, each=True)
    activation: str = option("relu", "relu | tanh | gelu | silu | sigmoid", choices=tuple(_ACTIVATIONS))
    dims: int | None = option(None, "null = follow the task; 1 or 2 to insist on a rank", choices=(1, 2))

    def __post_init__(self):
        check_options(self, "target.")


@dataclass(frozen=True)
class PocCNNOptions:
    """``target=poc_cnn``: the proof of concept's MNIST CNN (421,642 parameters): conv3x3 1->32, conv3x3
    32->64, two 2x2 max-pools, fc 3136->128, fc 128->10. Needs 1x28x28 images (task=mnist). No options."""


def _build_mlp(cfg: Mapping, input_shape, num_classes) -> nn.Module:
    options = build_options(MLPOptions, cfg, "target.")
    return MLP(input_shape=input_shape, num_classes=num_classes, hidden=list(options.hidden),
               activation_name=options.activation)


def _build_cnn(cfg: Mapping, input_shape, num_classes) -> nn.Module:
    o = build_options(CNNOptions, cfg, "target.")
    return CNN(input_shape=input_shape, num_classes=num_classes, channels=list(o.channels),
               kernel_size=_int_or_list(o.kernel_size), stride=int(o.stride), padding=o.padding,
               pool=int(o.pool or 0), fc=list(o.fc), activation_name=o.activation, dims=o.dims)


def _int_or_list(value):
    return int(value) if isinstance(value, (int, float, str)) else [int(v) for v in value]


def _build_poc_cnn(cfg: Mapping, input_shape, num_classes) -> nn.Module:
    """The proof of concept's MNIST CNN: 421,642 parameters, needs 1 x 28 x 28 images."""
    if tuple(input_shape) != (1, 28, 28) or num_classes != 10:
        raise SynthNetError(f"poc_cnn needs 1x28x28 images with 10 classes (task mnist); "
                            f"this task gives input {tuple(input_shape)} with {num_classes} classes")
    build_options(PocCNNOptions, cfg, "target.")
    return CNN(input_shape=input_shape, num_classes=num_classes, channels=[32, 64], kernel_size=3,
               padding=1, pool=2, fc=[128], activation_name="relu", dims=2)


# Keys that set only widths and depths. Tokens describe units by role, never by position in a fixed vector, so
# a generator trained with one value of these keys can run, zero-shot, on another; any other key (the target
# itself, activation, kernel, stride, pooling) changes what a layer computes.
SIZE_KEYS: dict[str, tuple[str, ...]] = {"mlp": ("hidden",), "cnn": ("channels", "fc")}


def serving_difference(trained: Mapping, requested: Mapping) -> str | None:
    """Why a generator trained for target config ``trained`` cannot make ``requested`` networks, or None
    (same target and every key equal but the width / depth keys of :data:`SIZE_KEYS`; a CNN's per-layer
    ``kernel_size`` list may differ too, as long as every size in it is one the generator was trained with)."""
    if trained.get("name") != requested.get("name"):
        return f"it makes '{trained.get('name')}' networks, not '{requested.get('name')}'"
    sizes = SIZE_KEYS.get(str(requested.get("name")), ())
    for key in sorted(set(trained) | set(requested)):
        if key == "kernel_size" and requested.get("name") == "cnn":
            # one size per layer: a CNN of another depth lists another number of sizes; any size it has seen serves
            def kernels(value) -> set:
                return set(value) if isinstance(value, (list, tuple)) else {value}
            unseen = sorted(kernels(requested.get(key)) - kernels(trained.get(key)), key=str)
            if unseen:
                return (f"its target.kernel_size is {trained.get(key)!r}: a kernel of size {unseen[0]!r} is one it "
                        f"has never seen")
        elif key != "name" and key not in sizes and trained.get(key) != requested.get(key):
            return f"its target.{key} is {trained.get(key)!r}, not {requested.get(key)!r}"
    return None


# The key whose entries a family draws (one width per layer, a number of layers), per target.
FAMILY_KEY: dict[str, str] = {"mlp": "hidden", "cnn": "channels"}


def family_member(config: Mapping, widths: Sequence[int], depths: Sequence[int], seed: int) -> dict:
    """One architecture of the family around ``config``, picked reproducibly by ``seed``: the number of layers
    of its :data:`FAMILY_KEY` from ``depths`` (or its own), each layer's width from ``widths`` (or the config's
    own first width). Every other key stays as it is."""
    import random

    name = str(config.get("name"))
    if name not in FAMILY_KEY:
        raise SynthNetError(f"target={name} has no architecture family (families exist for: "
                            f"{', '.join(sorted(FAMILY_KEY))})")
    key = FAMILY_KEY[name]
    own = [int(v) for v in config[key]]
    if depths and name == "cnn" and not isinstance(config.get("kernel_size"), (int, float)):
        raise SynthNetError("a family of CNN depths needs one target.kernel_size for all layers, not a list")
    rng = random.Random(int(seed))
    depth = rng.choice(list(depths)) if depths else len(own)
    member = [rng.choice(list(widths)) if widths else own[0] for _ in range(depth)]
    return {**dict(config), key: member}


def in_family(config: Mapping, base: Mapping, widths: Sequence[int], depths: Sequence[int]) -> bool:
    """Whether ``config`` is ``base`` or a member of the family around it (every other key equal)."""
    if dict(config) == dict(base):
        return True
    key = FAMILY_KEY.get(str(base.get("name")))
    if key is None or not (widths or depths) or not isinstance(base.get(key), list) or not base[key] or \
            {k: v for k, v in config.items() if k != key} != {k: v for k, v in base.items() if k != key}:
        return False
    values = list(config.get(key) or [])
    return (len(values) in depths if depths else len(values) == len(base[key])) and \
        all(v in (widths if widths else [base[key][0]]) for v in values)


def architecture_tag(config: Mapping) -> str:
    """A folder-safe name of a config's widths and depths, e.g. ``hidden-48-48`` or ``channels-16-32_fc-none``."""
    parts = []
    for key in SIZE_KEYS.get(str(config.get("name")), ()):
        value = config.get(key)
        values = value if isinstance(value, (list, tuple)) else [value]
        parts.append(f"{key}-{'-'.join(str(v) for v in values) or 'none'}")
    return "_".join(parts) or str(config.get("name"))


TARGETS: dict[str, tuple[type, Callable[[Mapping, tuple, int], nn.Module]]] = {
    "mlp": (MLPOptions, _build_mlp),
    "cnn": (CNNOptions, _build_cnn),
    "poc_cnn": (PocCNNOptions, _build_poc_cnn),
}


def build_target(cfg: Mapping, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """Build the target named ``cfg['name']`` for a task's input shape (channel first) and classes."""
    name = cfg["name"]
    if name not in TARGETS:
        raise SynthNetError(f"unknown target '{name}'; available: {', '.join(sorted(TARGETS))}")
    try:
        return TARGETS[name][1](cfg, tuple(input_shape), int(num_classes))
    except (TypeError, ValueError) as exc:  # an option of the wrong type or out of range, from the config
        options = {k: v for k, v in dict(cfg).items() if k != "name"}
        raise SynthNetError(f"target={name} cannot be built from target options {options} "
                            f"({str(exc).strip().splitlines()[0]})") from None


def init_state_dict(cfg: Mapping, input_shape: Sequence[int], num_classes: int, seed: int) -> dict[str, torch.Tensor]:
    """The target's own random initialisation for ``seed``, without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = build_target(cfg, input_shape, num_classes)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def hidden_sizes(specs: Sequence[LayerSpec], state_dict: Mapping[str, torch.Tensor]) -> list[int]:
    """Number of hidden units after each layer but the last (the permutable ones)."""
    return [int(state_dict[s.weight].shape[0]) for s in specs[:-1]]


def expand_permutation(perm: torch.Tensor, repeat: int) -> torch.Tensor:
    """A permutation of C units as the matching permutation of C * repeat flattened columns."""
    if repeat == 1:
        return perm
    return (perm[:, None] * repeat + torch.arange(repeat, device=perm.device)).reshape(-1)


def permute_hidden(state_dict: Mapping[str, torch.Tensor], specs: Sequence[LayerSpec],
                   perms: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reorder hidden units: ``perms[i]`` reorders the outputs of layer i and the matching inputs
    of layer i+1. The result computes exactly the same function."""
    if len(perms) != len(specs) - 1:
        raise SynthNetError(f"need {len(specs) - 1} permutations, got {len(perms)}")
    out = dict(state_dict)
    for i, perm in enumerate(perms):
        layer, nxt = specs[i], specs[i + 1]
        out[layer.weight] = out[layer.weight][perm]
        if layer.bias is not None:
            out[layer.bias] = out[layer.bias][perm]
        out[nxt.weight] = out[nxt.weight][:, expand_permutation(perm, nxt.in_repeat)]
    return out


def random_permutations(specs: Sequence[LayerSpec], state_dict: Mapping[str, torch.Tensor],
                        generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """One uniformly random permutation per hidden layer."""
    return [torch.randperm(n, generator=generator) for n in hidden_sizes(specs, state_dict)]


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
