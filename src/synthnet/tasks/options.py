"""Each task's options: defaults, help and ranges, written once (read by the loaders and by the config
schema, ``configs/schema.py``)."""

from __future__ import annotations

from dataclasses import dataclass

from synthnet.options import check_options, option


@dataclass(frozen=True)
class DigitsOptions:
    """``task=digits``: scikit-learn's bundled 8x8 digits (1,797 images), the embedded default; no download."""

    test_fraction: float = option(0.2, "stratified, seeded test split", low=0, high=1, low_open=True, high_open=True)
    val_fraction: float = option(0.1, "carved from the training part", low=0, high=1, low_open=True,
                                 high_open=True)
    split_seed: int = option(0, "seed of the splits", low=0)

    def __post_init__(self):
        check_options(self, "task.")


@dataclass(frozen=True)
class MNISTOptions:
    """``task=mnist``: real MNIST from the four standard IDX files (raw or .gz) in ``dir``."""

    dir: str | None = option(None, "folder of the IDX files; null = <paths.data_dir>/mnist")
    download: bool = option(False, "true fetches the files from `mirror` (needs network access)")
    mirror: str = option("https://ossci-datasets.s3.amazonaws.com/mnist", "where task.download fetches from")
    val_fraction: float = option(5000 / 60000, "share of the 60,000 training images held out for validation",
                                 low=0, high=1, low_open=True, high_open=True)
    split_seed: int = option(0, "seed of the validation split", low=0)
    standardize: bool = option(True, "subtract the training split's mean pixel and divide by its standard deviation "
                                     "(about 0.13 and 0.31, the usual MNIST preprocessing); false = pixels in [0, 1]")

    def __post_init__(self):
        check_options(self, "task.")


@dataclass(frozen=True)
class MNIST1DOptions:
    """``task=mnist1d``: MNIST-1D, generated procedurally by the mnist1d package (4,000 train / 1,000 test,
    length 40)."""

    num_samples: int = option(5000, "examples generated (train + test)", low=10, high=10_000_000)
    data_seed: int = option(42, "the package's data seed (42 is its default)", low=0)
    val_fraction: float = option(0.1, "carved from the training part", low=0, high=1, low_open=True,
                                 high_open=True)
    split_seed: int = option(0, "seed of the validation split", low=0)

    def __post_init__(self):
        check_options(self, "task.")
