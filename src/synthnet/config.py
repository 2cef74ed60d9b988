"""Configuration shared by every command: the command registry, Hydra composition of the packaged
config (``synthnet/configs``), checked reads of config values, and the checks every command runs
before any work (:func:`check_common`). Commands import from here, never from :mod:`synthnet.cli`.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf

from synthnet.budget import nearest_existing
from synthnet.errors import SynthNetError

COMMANDS: dict[str, tuple[Callable[[DictConfig], None], str]] = {}


def command(name: str, help_text: str):
    """Register ``fn(cfg)`` as ``synthnet NAME``; command modules live in ``synthnet.commands``."""
    def register(fn):
        COMMANDS[name] = (fn, help_text)
        return fn
    return register


def config_groups() -> dict[str, list[str]]:
    """``{group: [option, ...]}`` for every config group packaged with SynthNet."""
    root = resources.files("synthnet.configs")
    groups = {}
    for entry in root.iterdir():
        if entry.is_dir() and not entry.name.startswith("_"):
            groups[entry.name] = sorted(p.name[:-5] for p in entry.iterdir() if p.name.endswith(".yaml"))
    return groups


def _check_group_overrides(overrides: list[str]) -> None:
    groups = config_groups()
    for override in overrides:
        key, sep, value = override.lstrip("+~").partition("=")
        if sep and key in groups and value not in ("null", "") and value not in groups[key]:
            raise SynthNetError(f"unknown {key} '{value}'; available: {', '.join(groups[key])}")


def compose(overrides: list[str]) -> DictConfig:
    """The root config with ``overrides`` applied, all interpolations resolved."""
    from hydra import compose as hydra_compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    _check_group_overrides(overrides)
    try:
        with initialize_config_module(config_module="synthnet.configs", version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=overrides)
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise SynthNetError(f"bad config override: {str(exc).strip().splitlines()[0]}") from None
    return cfg


def container(node) -> dict:
    return OmegaConf.to_container(node, resolve=True)


def positive_int(cfg: DictConfig, key: str) -> int:
    value = OmegaConf.select(cfg, key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise SynthNetError(f"{key} must be a positive integer, got {value!r}")
    return value


def non_negative_int(cfg: DictConfig, key: str) -> int:
    value = OmegaConf.select(cfg, key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise SynthNetError(f"{key} must be an integer >= 0, got {value!r}")
    return value


def number(cfg: DictConfig, key: str) -> float:
    """``key`` as a finite float, or a one-line error naming it."""
    value = OmegaConf.select(cfg, key)
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise SynthNetError(f"{key} must be a number, got {value!r}") from None
    if result != result or result in (float("inf"), float("-inf")):
        raise SynthNetError(f"{key} must be a finite number, got {value!r}")
    return result


def _keys(node, prefix: str = "") -> set[str]:
    out = set()
    for key, value in node.items():
        path = f"{prefix}{key}"
        out.add(path)
        if isinstance(value, DictConfig):
            out |= _keys(value, path + ".")
    return out


def check_common(cfg: DictConfig, overrides: list[str], writes: bool) -> None:
    """Checks every command shares, before any work: no unknown keys, a device that exists here, seeds
    >= 0, and (for commands that write) a ``paths.root`` that is a writable folder."""
    import os

    import torch

    groups = set(config_groups())
    base = compose([o for o in overrides if o.lstrip("+~").partition("=")[0] in groups])
    unknown = sorted(k for k in _keys(cfg) - _keys(base) if not k.startswith("generator.") and k != "allow_large")
    if unknown:  # generator options are checked by the generator itself
        raise SynthNetError(f"unknown config key '{unknown[0]}' (a typo? `synthnet config` prints every key)")
    try:
        device = torch.device(str(cfg.device))
    except RuntimeError:
        raise SynthNetError(f"device={cfg.device!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise SynthNetError(f"device={cfg.device} but this machine has {torch.cuda.device_count()} CUDA device(s); "
                            f"use device=cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SynthNetError("device=mps but MPS is not available here; use device=cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise SynthNetError(f"device={cfg.device} is not supported; use cpu, cuda, cuda:N or mps")
    for key in ("seed", "zoo.first_seed", "generate.first_seed", "evaluate.first_seed", "method.first_seed"):
        if OmegaConf.select(cfg, key) is not None:
            non_negative_int(cfg, key)
    if writes:
        root = OmegaConf.select(cfg, "paths.root")
        if root is None or not str(root).strip():
            raise SynthNetError("paths.root is empty; name the folder everything is written under")
        path = Path(str(root)).absolute()
        if path.exists() and not path.is_dir():
            raise SynthNetError(f"paths.root={root} is a file, not a folder")
        nearest = nearest_existing(path)
        if not nearest.is_dir() or not os.access(nearest, os.W_OK | os.X_OK):
            raise SynthNetError(f"paths.root={root} cannot be written ({nearest} is read-only or not a folder)")
