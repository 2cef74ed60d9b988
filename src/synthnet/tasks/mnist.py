"""Real MNIST from the standard IDX files, raw or gzipped, in a directory the user names.

Nothing is downloaded unless ``task.download=true``; then the four files are fetched from
the public mirror named in the task config and written atomically.
"""

from __future__ import annotations

import gzip
import struct
import urllib.request
from pathlib import Path

import numpy as np

from synthnet.errors import SynthNetError
from synthnet.storage import atomic_path
from synthnet.tasks.base import Task, carve_validation, make_task
from synthnet.tasks.options import MNISTOptions

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (gzipped if its name ends in .gz). Raises on a bad magic or size."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise SynthNetError(f"cannot read IDX file {path}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise SynthNetError(f"{path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise SynthNetError(f"{path} is truncated (header)")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise SynthNetError(f"{path} has {len(raw) - header} data bytes, expected {expected} for shape {shape}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _find(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def download(directory: Path, mirror: str) -> None:
    """Fetch the four gzipped IDX files into ``directory`` (atomic writes; existing files kept)."""
    directory.mkdir(parents=True, exist_ok=True)
    for stem in FILES.values():
        if _find(directory, stem) is not None:
            continue
        url = mirror.rstrip("/") + "/" + stem + ".gz"
        try:
            with atomic_path(directory / (stem + ".gz")) as tmp, open(tmp, "wb") as out, \
                    urllib.request.urlopen(url, timeout=60) as response:
                out.write(response.read())
        except OSError as exc:
            raise SynthNetError(f"could not download {url}: {exc}") from None


def load_mnist_task(options: MNISTOptions, data_dir: Path) -> Task:
    """Images (1, 28, 28), validation carved from the 60k training images; pixels in [0, 1], then, with
    ``standardize``, shifted and scaled by the training split's own mean and standard deviation (never the
    validation or test images')."""
    directory = Path(options.dir or data_dir / "mnist")
    if options.download:
        download(directory, str(options.mirror))
    paths = {key: _find(directory, stem) for key, stem in FILES.items()}
    missing = [FILES[key] + "[.gz]" for key, path in paths.items() if path is None]
    if missing:
        raise SynthNetError(f"MNIST files missing in {directory}: {', '.join(missing)} "
                            f"(set task.dir=DIR, or task.download=true with network access)")
    arrays = {key: read_idx(path) for key, path in paths.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise SynthNetError(f"MNIST {split} images {images.shape} and labels {labels.shape} do not match")
    x = arrays["train_images"].astype(np.float32) / 255.0
    x_test = arrays["test_images"].astype(np.float32) / 255.0
    x_train, y_train, x_val, y_val = carve_validation(
        x, arrays["train_labels"].astype(np.int64), float(options.val_fraction),
        int(options.split_seed))
    if options.standardize:
        mean, std = float(x_train.mean()), float(x_train.std())
        if not std > 0:
            raise SynthNetError(f"MNIST training images in {directory} are all {mean}: nothing to standardize")
        x_train, x_val, x_test = ((a - mean) / std for a in (x_train, x_val, x_test))
    height, width = x.shape[1:]
    return make_task("mnist", (1, height, width), 10,
                     (x_train, y_train, x_val, y_val, x_test, arrays["test_labels"].astype(np.int64)))
