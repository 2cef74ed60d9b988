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
    """``{group: [option, ...]}``: the schema's group options and the packaged experiment presets."""
    from synthnet.configs.schema import GROUPS

    groups = {group: sorted(options) for group, options in GROUPS.items()}
    presets = resources.files("synthnet.configs") / "experiment"
    groups["experiment"] = sorted(p.name[:-5] for p in presets.iterdir() if p.name.endswith(".yaml"))
    return groups


def _check_group_overrides(overrides: list[str]) -> None:
    groups = config_groups()
    for override in overrides:
        key, sep, value = override.lstrip("+~").partition("=")
        if sep and key in groups and value not in ("null", "") and value not in groups[key]:
            raise SynthNetError(f"unknown {key} '{value}'; available: {', '.join(groups[key])}")


def _composition_error(exc: Exception) -> str:
    """One line naming the key and the problem, from Hydra's or OmegaConf's exception chain (the key's
    error is the chain's ``__cause__`` or ``__context__``; Hydra names the YAML file that set it)."""
    import re

    from omegaconf.errors import OmegaConfBaseException

    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    source = re.match(r"In '([^']+)':", first)
    cause: BaseException | None = exc
    while cause is not None and not (isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None)):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        return first
    message = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    where = f" (set by {source.group(1)}.yaml)" if source else ""
    if "not in" in message or "is not in struct" in message:
        if source:
            return f"unknown config key '{cause.full_key}'{where}: it does not apply to the chosen config groups"
        return f"unknown config key '{cause.full_key}' (a typo? `synthnet config` prints every key)"
    converted = re.match(r"Value '(.*)' of type '\w+' could not be converted to (\w+)", message)
    if converted:
        kind = {"Integer": "an integer", "Float": "a number", "Boolean": "true or false"}.get(
            converted.group(2), converted.group(2).lower())
        return f"{cause.full_key} must be {kind}, got '{converted.group(1)}'{where}"
    if "is not a ListConfig, list or tuple" in message:
        return f"{cause.full_key} must be a list, e.g. [32, 16]{where}"
    return f"{cause.full_key}: {message}{where}"


def compose(overrides: list[str]) -> DictConfig:
    """The root config with ``overrides`` applied, all interpolations resolved, every value type- and
    range-checked against the schema (``synthnet/configs/schema.py``)."""
    from hydra import compose as hydra_compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from synthnet.configs.schema import check_ranges, register

    register()
    _check_group_overrides(overrides)
    overrides = [o[1:] if o.startswith("+allow_large=") else o for o in overrides]  # an older spelling
    try:
        with initialize_config_module(config_module="synthnet.configs", version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=overrides)
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise SynthNetError(f"bad config override: {_composition_error(exc)}") from None
    check_ranges(cfg)
    return cfg


def container(node) -> dict:
    return OmegaConf.to_container(node, resolve=True)


def settings(cls: type, node: DictConfig, **fixed):
    """The library settings ``cls`` (a dataclass) from the keys of config ``node`` that are its fields (the
    node's other keys are the command's own; the schema already refused unknown ones), lists as tuples,
    then ``fixed`` on top (values the command derives, e.g. a seed)."""
    import dataclasses

    values = container(node)
    picked = {f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values}
    picked = {k: tuple(v) if isinstance(v, list) else v for k, v in picked.items()}
    return cls(**{**picked, **fixed})


def check_common(cfg: DictConfig, overrides: list[str], writes: bool) -> None:
    """Checks every command shares, before any work: a device that exists here and (for commands that write)
    a ``paths.root`` that is a writable folder. Unknown keys, types and ranges are refused by :func:`compose`."""
    import os

    import torch

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
