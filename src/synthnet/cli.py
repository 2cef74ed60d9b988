"""The one command-line entry point: ``synthnet COMMAND [key=value ...]``.

Every command composes the packaged Hydra config (``synthnet/configs``) with the given
overrides, builds the objects it needs here, at the edge, and hands them to library
functions that never read config. Errors a user can fix print one line and exit 2.
"""

from __future__ import annotations

import logging
import os
import sys

from omegaconf import DictConfig

from synthnet import __version__
from synthnet.config import COMMANDS, check_common, command, compose, config_groups
from synthnet.errors import SynthNetError

log = logging.getLogger("synthnet")

# --------------------------------------------------------------------------- commands


@command("config", "print the composed config, every key with its meaning, and exit")
def config_command(cfg: DictConfig) -> None:
    from synthnet.configs.schema import describe

    print(describe(cfg), end="")


# --------------------------------------------------------------------------- entry point


def usage() -> str:
    lines = [f"synthnet {__version__}: synthesize trained network weights from random inits.", "",
             "usage: synthnet COMMAND [key=value ...]", "", "commands:"]
    width = max(len(n) for n in COMMANDS)
    lines += [f"  {name.ljust(width)}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "config groups (choose with group=option):"]
    lines += [f"  {group}: {', '.join(options)}" for group, options in sorted(config_groups().items())]
    lines += ["", "Any config key can be overridden, e.g. zoo.runs=16 paths.root=/tmp/synthnet.",
              "`synthnet config [overrides]` prints the composed config with each key's meaning",
              "(the typed schema: src/synthnet/configs/schema.py); a wrong type or a value out of",
              "range is refused before any work, naming the key.",
              "Multi-process: torchrun --nproc_per_node=2 -m synthnet zoo|train|generate|evaluate ...",
              "(zoo runs, generation and SGD twins split by seed; training data parallel; rank 0 writes)."]
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
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and name not in ("zoo", "train", "generate", "evaluate",
                                                                       "config"):
            raise SynthNetError(f"`synthnet {name}` runs in one process; run it without torchrun (zoo, train, "
                                f"generate and evaluate share their work across torchrun's processes)")
        cfg = compose(overrides)
        check_common(cfg, overrides, writes=name != "config")
        COMMANDS[name][0](cfg)
    except SynthNetError as exc:
        message = " ".join(str(exc).split("\n"))  # one line, whatever a file's header put into it
        print(f"synthnet: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("synthnet: interrupted; completed files are kept, partial ones were never written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # run as a file: use the importable module so commands register once
    from synthnet.cli import main as package_main

    sys.exit(package_main())
