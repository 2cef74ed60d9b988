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


MAX_HEADER_DEPTH = 32  # nesting of a JSON value in a header; SynthNet writes at most 4


def _depth(text: str) -> int:
    """Deepest bracket nesting of a JSON text (outside strings), without parsing it."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            escaped, in_string = (False, in_string) if escaped else (char == "\\", char != '"')
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _decode(raw: Mapping[str, str] | None, path: str | Path | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in (raw or {}).items():
        if isinstance(value, str) and value[:1] in "[{" and _depth(value) > MAX_HEADER_DEPTH:
            raise SynthNetError(f"header key {key!r} of {path} is nested deeper than {MAX_HEADER_DEPTH} levels; "
                                f"not a file SynthNet wrote")
        try:
            out[key] = json.loads(value)
        except (TypeError, ValueError):
            out[key] = value
    return out


def _read_error(path: Path, exc: BaseException) -> SynthNetError:
    """The real reason a file could not be read, in one line."""
    import errno

    if isinstance(exc, OSError) and exc.errno == errno.ELOOP:
        return SynthNetError(f"{path} is a symlink loop")
    if isinstance(exc, PermissionError) or (isinstance(exc, OSError) and exc.errno == errno.EACCES):
        return SynthNetError(f"permission denied reading {path}")
    if path.is_dir():
        return SynthNetError(f"{path} is a directory, not a safetensors file")
    if isinstance(exc, FileNotFoundError) or not os.path.lexists(path):
        return SynthNetError(f"no such file: {path}")
    if path.is_symlink() and not path.exists():
        return SynthNetError(f"{path} is a broken symlink")
    return SynthNetError(f"corrupt or truncated safetensors file {path}: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}")


def _check_readable(path: Path) -> None:
    """Raise the real cause (loop, permission, directory, missing) before the reader reports a generic one."""
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise _read_error(path, exc) from None


@contextmanager
def atomic_path(path: str | Path) -> Iterator[str]:
    """Yield a temp file name beside ``path``; on success it is renamed onto ``path`` with the
    permissions a plain ``open`` would give (mkstemp makes it 0600), on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # somebody else's process
        return True
    return True


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove the temp files a killed save of ``path`` left beside it (``.<name>.<pid>.<random>.tmp``
    whose process on this machine is gone); returns them. A save in progress keeps its file."""
    import logging

    path = Path(path)
    removed = []
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        pid = tmp.name[len(path.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            try:
                tmp.unlink()
                removed.append(tmp)
            except FileNotFoundError:
                pass
    if removed:
        logging.getLogger("synthnet").warning("removed %d temp file(s) a killed save left beside %s",
                                              len(removed), path)
    return removed


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
    _check_readable(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata()
    except (SafetensorError, OSError, ValueError) as exc:
        raise _read_error(path, exc) from None
    return _decode(raw, path)


def check_finite(state_dict: Mapping[str, torch.Tensor], path: str | Path | None = None) -> None:
    for name, tensor in state_dict.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            where = f" in {path}" if path is not None else ""
            raise SynthNetError(f"tensor {name!r}{where} holds NaN or Inf values")


def check_against(state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor | torch.Size],
                  path: str | Path | None = None, expects: str = "the target") -> None:
    """Raise naming the first missing, extra or wrongly shaped tensor."""
    where = f" in {path}" if path is not None else ""
    for name in expected:
        if name not in state_dict:
            raise SynthNetError(f"tensor {name!r} missing{where} ({expects} has it)")
    for name in state_dict:
        if name not in expected:
            raise SynthNetError(f"unexpected tensor {name!r}{where} ({expects} has no such tensor)")
    for name, ref in expected.items():
        shape = tuple(ref.shape if isinstance(ref, torch.Tensor) else ref)
        if tuple(state_dict[name].shape) != shape:
            raise SynthNetError(f"tensor {name!r}{where} has shape {tuple(state_dict[name].shape)}, "
                                f"{expects} expects {shape}")
        if isinstance(ref, torch.Tensor) and state_dict[name].dtype != ref.dtype:  # never cast silently
            raise SynthNetError(f"tensor {name!r}{where} is {str(state_dict[name].dtype).removeprefix('torch.')}, "
                                f"{expects} expects {str(ref.dtype).removeprefix('torch.')}")


def load_state_dict(path: str | Path, expected: torch.nn.Module | Mapping[str, Any] | None = None,
                    expects: str = "the target") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load ``(tensors, metadata)``; validate against ``expected`` (a model, a state dict or a name->shape
    map): names, shapes, and dtypes where it holds tensors (nothing is cast). ``expects`` names it in errors."""
    path = Path(path)
    _check_readable(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata()
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise _read_error(path, exc) from None
    metadata = _decode(raw, path)
    if expected is not None:
        reference = expected.state_dict() if isinstance(expected, torch.nn.Module) else expected
        check_against(tensors, reference, path, expects)
    check_finite(tensors, path)
    return tensors, metadata
