"""Weights on disk: ``.safetensors`` only, with provenance in the header metadata.

Every write goes to a temporary file in the destination folder and is renamed into
place, so an interrupted process never leaves a half-written file. Every read checks the
file (truncated or corrupt files name the file), the tensor names and shapes (against a
target model when given) and that no value is NaN or infinite. Nothing here pickles.

Metadata values are strings in the file: strings are stored as they are, everything else
(numbers, lists, dicts) as JSON, and :func:`read_metadata` decodes them again.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from synthnet.errors import SynthNetError


def _encode(metadata: Mapping[str, Any]) -> dict[str, str]:
    return {str(k): v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in metadata.items()}


def _decode(raw: Mapping[str, str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in (raw or {}).items():
        try:
            out[key] = json.loads(value)
        except (TypeError, ValueError):
            out[key] = value
    return out


@contextmanager
def atomic_path(path: str | Path) -> Iterator[str]:
    """Yield a temp file name beside ``path``; on success it is renamed onto ``path`` with the
    permissions a plain ``open`` would give (mkstemp makes it 0600), on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file and a rename."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def save_state_dict(path: str | Path, state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> None:
    """Save tensors (made contiguous, moved to CPU) with ``metadata`` in the header, atomically."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    check_finite(tensors, path)
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=_encode(metadata))


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The header metadata, decoded, without loading any tensor."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return _decode(f.metadata())
    except FileNotFoundError:
        raise SynthNetError(f"no such file: {path}") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise SynthNetError(f"corrupt or truncated safetensors file {path}: {exc}") from None


def check_finite(state_dict: Mapping[str, torch.Tensor], path: str | Path | None = None) -> None:
    for name, tensor in state_dict.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            where = f" in {path}" if path is not None else ""
            raise SynthNetError(f"tensor '{name}'{where} holds NaN or Inf values")


def check_against(state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor | torch.Size],
                  path: str | Path | None = None) -> None:
    """Raise naming the first missing, extra or wrongly shaped tensor."""
    where = f" in {path}" if path is not None else ""
    for name in expected:
        if name not in state_dict:
            raise SynthNetError(f"tensor '{name}' missing{where}")
    for name in state_dict:
        if name not in expected:
            raise SynthNetError(f"unexpected tensor '{name}'{where}")
    for name, ref in expected.items():
        shape = tuple(ref.shape if isinstance(ref, torch.Tensor) else ref)
        if tuple(state_dict[name].shape) != shape:
            raise SynthNetError(f"tensor '{name}'{where} has shape {tuple(state_dict[name].shape)}, "
                                f"the target expects {shape}")


def load_state_dict(path: str | Path, expected: torch.nn.Module | Mapping[str, Any] | None = None
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load ``(tensors, metadata)``; validate against ``expected`` (a model or a name->shape map)."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = _decode(f.metadata())
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except FileNotFoundError:
        raise SynthNetError(f"no such file: {path}") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise SynthNetError(f"corrupt or truncated safetensors file {path}: {exc}") from None
    if expected is not None:
        reference = expected.state_dict() if isinstance(expected, torch.nn.Module) else expected
        check_against(tensors, reference, path)
    check_finite(tensors, path)
    return tensors, metadata
