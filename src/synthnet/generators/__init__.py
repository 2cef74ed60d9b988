"""Weight generators: denoisers ``(tokens, t_source, t_target, layout) -> tokens`` and their files.

Every generator module has ``forward(tokens (B, N, C), t_source (B,), t_target (B,), layout)
-> (B, N, C)`` (a denoiser for :func:`synthnet.sampling.sample`), ``auxiliary_loss()`` (a
scalar from the last forward: the Mixture-of-Experts balance and z losses, zero for the
flat baseline) and ``expert_usage()`` (a dict, or None without experts).

A generator is stored as one ``.safetensors`` file holding its (EMA) weights, with the full
generator, target and task configs and the token chunk size in the header, so the file
alone rebuilds it. A new generator is one entry in :data:`GENERATORS` plus one schema line in
``configs/schema.py`` (its options come from the constructor's signature).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

import logging

from synthnet import __version__
from synthnet.errors import SynthNetError
from synthnet.generators.flat_mlp import FlatMLPGenerator
from synthnet.generators.perceiver_moe import PerceiverMoEGenerator
from synthnet.storage import load_state_dict, read_metadata, save_state_dict
from synthnet.tokenization import TokenLayout

log = logging.getLogger("synthnet")

FILE_KIND = "synthnet-generator"
MAX_OPTION = 1 << 16  # largest integer option a generator header may hold (widths, ranks, units)
MAX_MODULE_COUNT = 1024  # largest count of modules (experts, blocks, heads) a header may ask for
_NOT_MODULE_OPTIONS = {"name", "chunk_size", "bias_chunk"}  # tokenizer options, not the module's


def _options(config: Mapping, cls: type) -> dict[str, Any]:
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "chunk_size", "num_values"}
    options = {k: v for k, v in config.items() if k not in _NOT_MODULE_OPTIONS}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise SynthNetError(f"unknown option generator.{unknown[0]} for generator '{config['name']}'; "
                            f"available: {', '.join(sorted(accepted))}")
    return options


def _perceiver(config: Mapping, num_values: int, chunk_size: int) -> nn.Module:
    return PerceiverMoEGenerator(chunk_size=chunk_size, **_options(config, PerceiverMoEGenerator))


def _flat(config: Mapping, num_values: int, chunk_size: int) -> nn.Module:
    return FlatMLPGenerator(num_values=num_values, **_options(config, FlatMLPGenerator))


GENERATORS: dict[str, Callable[[Mapping, int, int], nn.Module]] = {
    "perceiver_moe": _perceiver,
    "flat_mlp": _flat,
}


def _construct(config: Mapping, num_values: int, chunk_size: int) -> nn.Module:
    name = config.get("name")
    if name not in GENERATORS:
        raise SynthNetError(f"unknown generator '{name}'; available: {', '.join(sorted(GENERATORS))}")
    return GENERATORS[name](config, int(num_values), int(chunk_size))


def build_generator(config: Mapping, layout: TokenLayout) -> nn.Module:
    """Build the generator ``config['name']`` with the other keys as options, for ``layout``."""
    if "chunk_size" in config and int(config["chunk_size"]) != layout.chunk_size:
        raise SynthNetError(f"generator.chunk_size {config['chunk_size']} differs from the layout's "
                            f"{layout.chunk_size}")
    return _construct(config, layout.num_values, layout.chunk_size)


@dataclass
class LoadedGenerator:
    """A generator rebuilt from its file: ``model`` is in eval mode with the (EMA) weights."""

    model: nn.Module
    config: dict
    target_config: dict
    task_config: dict
    chunk_size: int
    metadata: dict

    @property
    def bias_chunk(self) -> bool:
        """The tokenizer's ``bias_chunk`` this generator was trained with (files from before the option: False)."""
        return bool(self.config.get("bias_chunk", False))


def save_generator(path: str | Path, model: nn.Module, *, config: Mapping, target_config: Mapping,
                   task_config: Mapping, chunk_size: int, extra: Mapping[str, Any] | None = None) -> None:
    """Write ``model``'s weights atomically to ``path`` with everything needed to rebuild it in the header."""
    num_values = getattr(model, "num_values", None)
    metadata = {"kind": FILE_KIND, "generator": config["name"], "generator_config": dict(config),
                "target": target_config["name"], "target_config": dict(target_config),
                "task": task_config["name"], "task_config": dict(task_config), "chunk_size": int(chunk_size),
                "num_values": num_values, "synthnet_version": __version__, **dict(extra or {})}
    save_state_dict(path, model.state_dict(), metadata)


def _header_dict(metadata: Mapping[str, Any], key: str, path: Path) -> dict:
    value = metadata.get(key)
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise SynthNetError(f"{path}: header key '{key}' must be a config with a name, got "
                            f"{type(value).__name__ if value is not None else 'nothing'}")
    return value


def _header_int(metadata: Mapping[str, Any], key: str, path: Path, low: int, high: int) -> int:
    value = metadata.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise SynthNetError(f"{path}: header key '{key}' must be an integer in [{low}, {high}], got {value!r}")
    return value


def load_generator(path: str | Path, device: str | torch.device = "cpu") -> LoadedGenerator:
    """Rebuild the generator stored at ``path`` (eval mode, on ``device``).

    The header is untrusted: its configs and sizes are checked, and the generator it describes is
    first built on the ``meta`` device (no memory) and compared, name by name, with the tensors
    the file holds (shape and dtype), so a header that would build a huge model, or tensors of
    another dtype, are refused before anything is allocated or cast."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise SynthNetError(f"no generator file {path}; train one with `synthnet train` "
                            f"(or pass generate.generator=PATH)")
    metadata = read_metadata(path)
    if metadata.get("kind") != FILE_KIND or "generator_config" not in metadata:
        raise SynthNetError(f"{path} is not a SynthNet generator file (no generator config in its header)")
    config = _header_dict(metadata, "generator_config", path)
    target_config = _header_dict(metadata, "target_config", path)
    task_config = _header_dict(metadata, "task_config", path)
    chunk_size = _header_int(metadata, "chunk_size", path, 1, 1 << 16)
    num_values = _header_int(metadata, "num_values", path, 0, 1 << 20) if metadata.get("num_values") is not None \
        else 0
    if not isinstance(config.get("bias_chunk", False), bool):
        raise SynthNetError(f"{path}: generator_config 'bias_chunk' = {config['bias_chunk']!r} is not true or false")
    for key, value in config.items():  # bound sizes before building anything, even on the meta device
        limit = MAX_MODULE_COUNT if key in ("num_experts", "num_blocks", "num_heads", "decoder_depth", "probes") else MAX_OPTION
        if isinstance(value, int) and not isinstance(value, bool) and not 0 <= value <= limit:
            raise SynthNetError(f"{path}: generator_config '{key}' = {value} is outside [0, {limit}]; "
                                f"not a generator this file can hold")
    try:
        with torch.device("meta"):
            skeleton = _construct(config, num_values, chunk_size)
    except SynthNetError:
        raise
    except Exception as exc:  # noqa: BLE001 - any option value the constructor cannot take
        raise SynthNetError(f"{path}: its generator_config cannot build a generator "
                            f"({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''})"
                            ) from None
    tensors, metadata = load_state_dict(path, skeleton.state_dict(), expects="its header's generator_config")
    model = _construct(config, num_values, chunk_size)
    model.load_state_dict(tensors, strict=True)
    model.to(torch.device(device)).eval()
    return LoadedGenerator(model, config, target_config, task_config, chunk_size, metadata)


def check_generator_matches(path: Path, loaded, target_config: dict, task_config: dict) -> bool:
    """The one check that a generator file can serve: its training finished, it was trained on this task, and
    it makes this kind of network (:func:`synthnet.targets.serving_difference`: the same target and options;
    widths and depths may differ). Used by generate, evaluate, GRPO and the task method. Returns whether the
    architecture is one it has not seen (zero-shot), after saying so in the log."""
    from synthnet.targets import in_family, serving_difference

    if loaded.metadata.get("finished") is False:
        raise SynthNetError(f"{path} is an unfinished training ({loaded.metadata.get('method')}, stopped at "
                            f"{loaded.metadata.get('grpo_iteration', loaded.metadata.get('step'))}); finish it with "
                            f"`synthnet train` (same overrides) or leave it out")
    if loaded.task_config.get("name") != task_config.get("name"):
        raise SynthNetError(f"{path} was trained on task '{loaded.task_config.get('name')}', "
                            f"not '{task_config.get('name')}'")
    reason = serving_difference(loaded.target_config, target_config)
    if reason is not None:
        raise SynthNetError(f"{path} cannot make these networks: {reason}; pass the target= overrides it was "
                            f"trained with (only widths and depths may differ)")
    widths, depths = family_of(loaded.metadata)
    unseen = not in_family(target_config, loaded.target_config, widths, depths)
    if unseen:
        trained = loaded.target_config if not (widths or depths) else \
            f"{loaded.target_config} with widths {widths or 'its own'} and depths {depths or 'its own'}"
        log.warning("zero-shot: %s was trained on target %s; making %s, an architecture it has not seen", path,
                    trained, target_config)
    return unseen


def family_of(metadata: Mapping[str, Any]) -> tuple[list[int], list[int]]:
    """The family of architectures a generator was trained over (``method.family_widths`` / ``family_depths``
    in its header's method config); anything but lists of integers in that untrusted header reads as none."""
    method = metadata.get("method_config")
    method = method if isinstance(method, dict) else {}

    def ints(value) -> list[int]:
        ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        return list(value) if ok else []
    return ints(method.get("family_widths")), ints(method.get("family_depths"))
