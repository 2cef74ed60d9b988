"""Work and memory estimated before starting: a count, a step number or a zoo size that would not fit
in memory or on disk is refused with the estimate in the message (``allow_large=true`` goes ahead).

The estimates count what the commands keep: every generation step's networks (generate, evaluate),
every twin checkpoint (evaluate), every zoo checkpoint file (zoo). They are lower bounds, made from the
target's parameter count at 4 bytes a value.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from omegaconf import DictConfig

from synthnet.errors import SynthNetError


def _size(num_bytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if num_bytes < 1024:
            return f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return f"{num_bytes:.1f} PB"


def available_memory() -> int:
    """Bytes of memory free now (Linux/macOS sysconf; a large number where unknown)."""
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 1 << 50


def nearest_existing(path: str | Path) -> Path:
    """``path`` itself if it exists, else its nearest existing parent (what a mkdir would write into)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_disk(path: str | Path) -> int:
    """Free bytes on the file system that holds ``path`` (or its nearest existing parent)."""
    return shutil.disk_usage(nearest_existing(path)).free


def check_fits(cfg: DictConfig, what: str, needed: float, available: float, where: str) -> None:
    """Refuse ``what`` when ``needed`` bytes exceed ``available`` (unless ``allow_large``)."""
    if needed > available and not bool(cfg.get("allow_large", False)):
        raise SynthNetError(f"{what} needs about {_size(needed)} of {where}, {_size(available)} is free; "
                            f"lower it, or pass allow_large=true to try anyway")


def check_networks_in_memory(cfg: DictConfig, what: str, networks: float, parameters: int) -> None:
    check_fits(cfg, what, 4.0 * networks * parameters, available_memory(), "memory")


def check_files_on_disk(cfg: DictConfig, what: str, files: float, parameters: int, folder: str | Path) -> None:
    check_fits(cfg, what, 4.0 * files * parameters, free_disk(folder), f"disk under {folder}")
