"""Artefacts every training and generation command shares: where generator files go, where an
unfinished training keeps its resume state and how it is written and read back, the refusal to
replace a generator trained with other settings, and the metrics log (JSONL beside the generator,
TensorBoard under ``<target_dir>/tensorboard``). The check that a generator file can serve a target
is the library's: :func:`synthnet.generators.check_generator_matches`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig

from synthnet.errors import SynthNetError

DEFAULT_REWARD = "val_accuracy"


def generator_path(cfg: DictConfig, override: str | None) -> Path:
    """``override`` or ``{generators_dir}/{generator.name}-{method.name}.safetensors``."""
    if override:
        return Path(override)
    return Path(cfg.paths.generators_dir) / f"{cfg.generator.name}-{cfg.method.name}.safetensors"


def train_output(cfg: DictConfig, default: Path) -> Path:
    """Where ``synthnet train`` writes: ``train.output`` (a bare file name goes in ``paths.generators_dir``, beside
    the generators ``evaluate`` picks up; a path with a folder is taken as it is) or ``default``."""
    output = cfg.get("train", {}).get("output")
    if not output:
        return Path(default)
    path = Path(output)
    return Path(cfg.paths.generators_dir) / path if path.parent == Path(".") and not path.is_absolute() else path


def resume_path(path: Path) -> Path:
    """Where an unfinished training keeps its state: ``<folder>/resume/<name>`` (not a generator file,
    so it lives apart from the generators that ``evaluate`` picks up); removed when training ends."""
    return path.parent / "resume" / path.name


def save_resume_state(path: Path, parts: Mapping[str, Mapping[str, Any]], optimizer, metadata: Mapping[str, Any]
                      ) -> None:
    """An unfinished training's state in one safetensors file (atomically, no pickling): each part's tensors
    under ``<part>.`` (``model``, ``ema``, ``best``, ...) and the optimizer's per-parameter tensors under
    ``optimizer.``."""
    from synthnet.methods.imitation import optimizer_tensors
    from synthnet.storage import save_state_dict

    tensors = {f"{name}.{k}": v for name, state in parts.items() for k, v in state.items()}
    tensors.update({f"optimizer.{k}": v for k, v in optimizer_tensors(optimizer).items()})
    save_state_dict(path, tensors, dict(metadata))


def load_resume_state(path: Path, optimizer, device, fingerprint: str | None = None
                      ) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """``({part: state dict}, metadata)`` from :func:`save_resume_state`'s file, the optimizer's state loaded
    into ``optimizer``; a ``fingerprint`` other than the file's (other settings) is refused."""
    from synthnet.methods.imitation import load_optimizer_tensors
    from synthnet.storage import load_state_dict

    tensors, metadata = load_state_dict(path)
    if fingerprint is not None and metadata.get("fingerprint") != fingerprint:
        raise SynthNetError(f"{path} holds an interrupted training with other settings; remove it "
                            f"or pass train.resume=false to start over")
    parts: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        name, _, rest = key.partition(".")
        parts.setdefault(name, {})[rest] = value.to(device)
    load_optimizer_tensors(optimizer, parts.pop("optimizer", {}))
    return parts, metadata


def refuse_to_replace(cfg: DictConfig, path: Path, fingerprint: str) -> None:
    """A finished generator at ``path`` trained with other settings is never replaced silently: refused,
    with the two ways on (write beside it with ``train.output=``, or ``train.overwrite=true``)."""
    if not path.exists() or bool(cfg.train.get("overwrite", False)):
        return
    from synthnet.storage import read_metadata

    old = read_metadata(path).get("fingerprint")
    if old != fingerprint:
        raise SynthNetError(f"{path} holds a generator trained with other settings (fingerprint {old}, these "
                            f"settings {fingerprint}); pass train.output=<new file> to write beside it, or "
                            f"train.overwrite=true to replace it")


def metrics_log(cfg: DictConfig, path: Path, start_step: int, prefix: str, index: str = "step"):
    """``(on_metrics(step, metrics), writer)`` writing ``<stem>.metrics.jsonl`` beside the generator and
    TensorBoard scalars under ``<target_dir>/tensorboard/<stem>``. A fresh training starts a fresh log; a
    resumed one keeps only the records whose ``index`` (step, or GRPO's iteration) is up to ``start_step``,
    so no step is logged twice."""
    from synthnet.storage import atomic_write_bytes

    stem = path.name.removesuffix(".safetensors")
    jsonl = path.with_name(f"{stem}.metrics.jsonl")
    records = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()] \
        if start_step and jsonl.exists() else []
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(jsonl, "".join(json.dumps(r) + "\n" for r in records if r.get(index, 0) <= start_step).encode())
    writer = _tensorboard(Path(cfg.paths.target_dir) / "tensorboard" / stem, purge_step=start_step + 1 if start_step else None)

    def on_metrics(step: int, metrics: dict) -> None:
        with open(jsonl, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != index:
                    writer.add_scalar(f"{prefix}/{key}", value, step)
            for block, fractions in enumerate(metrics.get("expert_fraction", [])):
                for expert, value in enumerate(fractions):
                    writer.add_scalar(f"experts/block{block}/expert{expert}", value, step)

    return on_metrics, writer


def _tensorboard(log_dir: Path, purge_step: int | None = None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


def imitation_path(cfg: DictConfig) -> Path:
    """``method.source`` or ``<generators_dir>/<generator>-imitation.safetensors``."""
    source = cfg.method.get("source") if cfg.method.name in ("grpo", "task") else None
    return Path(source) if source else Path(cfg.paths.generators_dir) / f"{cfg.generator.name}-imitation.safetensors"


def grpo_stem(generator_name: str, reward_name: str) -> str:
    """File stem of a GRPO generator: ``<generator>-grpo`` for the default reward, else with the reward."""
    return f"{generator_name}-grpo" if reward_name == DEFAULT_REWARD else f"{generator_name}-grpo-{reward_name}"


def grpo_path(cfg: DictConfig) -> Path:
    """``train.output`` (:func:`train_output`) or ``<generators_dir>/<generator>-grpo[-<reward>].safetensors``."""
    return train_output(cfg, Path(cfg.paths.generators_dir) / f"{grpo_stem(cfg.generator.name, cfg.reward.name)}"
                                                               f".safetensors")


def stem_of(path: Path) -> str:
    return path.name.removesuffix(".safetensors")


def metrics_path(path: Path) -> Path:
    """Per-iteration JSONL records beside the generator file (imitation's convention)."""
    return path.with_name(f"{stem_of(path)}.metrics.jsonl")


def read_records(path: Path) -> list[dict[str, Any]]:
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
