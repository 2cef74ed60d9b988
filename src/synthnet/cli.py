"""The one command-line entry point: ``synthnet COMMAND [key=value ...]``.

Every command composes the packaged Hydra config (``synthnet/configs``) with the given
overrides, builds the objects it needs here, at the edge, and hands them to library
functions that never read config. Errors a user can fix print one line and exit 2.
"""

from __future__ import annotations

import logging
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf

from synthnet import __version__
from synthnet.errors import SynthNetError

log = logging.getLogger("synthnet")

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


# --------------------------------------------------------------------------- commands


@command("config", "print the composed config with the given overrides and exit")
def config_command(cfg: DictConfig) -> None:
    print(OmegaConf.to_yaml(cfg), end="")


# --------------------------------------------------------------------------- entry point


def usage() -> str:
    lines = [f"synthnet {__version__}: synthesize trained network weights from random inits.", "",
             "usage: synthnet COMMAND [key=value ...]", "", "commands:"]
    width = max(len(n) for n in COMMANDS)
    lines += [f"  {name.ljust(width)}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "config groups (choose with group=option):"]
    lines += [f"  {group}: {', '.join(options)}" for group, options in sorted(config_groups().items())]
    lines += ["", "Any config key can be overridden, e.g. zoo.runs=16 paths.root=/tmp/synthnet.",
              "`synthnet config [overrides]` prints the composed config; every key is commented in",
              "the packaged YAML files (src/synthnet/configs/).",
              "Multi-process: torchrun --nproc_per_node=2 -m synthnet zoo ..."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import synthnet.commands  # noqa: F401  (registers the commands)

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(__version__)
        return 0
    name, overrides = argv[0], argv[1:]
    if any(a in ("-h", "--help") for a in overrides):
        print(usage())
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        if name not in COMMANDS:
            raise SynthNetError(f"unknown command '{name}'; available: {', '.join(COMMANDS)}")
        cfg = compose(overrides)
        COMMANDS[name][0](cfg)
    except SynthNetError as exc:
        print(f"synthnet: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("synthnet: interrupted; completed files are kept, partial ones were never written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # run as a file: use the importable module so commands register once
    from synthnet.cli import main as package_main

    sys.exit(package_main())
