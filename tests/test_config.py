"""The typed config (``synthnet/configs/schema.py``): every key is declared once, with help; the packaged
YAML only selects and overrides; a wrong type or an out-of-range value of any key is refused, naming it."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from synthnet.config import compose
from synthnet.configs.schema import GROUPS, SynthNetConfig, check_ranges, describe
from synthnet.errors import SynthNetError

CONFIGS = Path(__file__).parents[1] / "src" / "synthnet" / "configs"


def _schemas():
    """(prefix, dataclass) for the root, its sections and every group option (nested ones included)."""
    out, todo = [], [("", SynthNetConfig)] + [(f"{g}.", c) for options in GROUPS.values() for c in options.values()
                                              for g in [next(k for k, v in GROUPS.items() if c in v.values())]]
    while todo:
        prefix, cls = todo.pop()
        out.append((prefix, cls))
        for f in dataclasses.fields(cls):
            if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
                todo.append((f"{prefix}{f.name}.", f.default_factory))
    return out


def test_the_packaged_yaml_only_selects_and_overrides():
    files = sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml"))
    assert files[0] == "config.yaml" and all(f.startswith("experiment/") for f in files[1:]), files
    assert set(yaml.safe_load((CONFIGS / "config.yaml").read_text())) == {"defaults"}


def test_every_key_has_help():
    missing = []
    for prefix, cls in _schemas():
        assert cls.__doc__, cls
        for f in dataclasses.fields(cls):
            section = f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory)
            group = f.name in GROUPS and cls is SynthNetConfig
            if not f.metadata.get("help") and not section and not group:
                missing.append(f"{prefix}{f.name}")
    assert not missing, missing


def test_composed_defaults_are_the_library_defaults():
    """One source: what a user gets from the CLI is what the library's classes give by default."""
    from synthnet.methods.grpo import GRPOSettings
    from synthnet.methods.imitation import ImitationSettings
    from synthnet.methods.task import TaskSettings
    from synthnet.targets import TARGETS
    from synthnet.tasks import TASKS
    from synthnet.zoo.training import Recipe

    cases = [([], "zoo", Recipe()), (["method=imitation"], "method", ImitationSettings()),
             ([], "method", TaskSettings()), (["method=grpo"], "method", GRPOSettings()),
             ([], "method.imitation", ImitationSettings())]
    cases += [([f"target={n}"], "target", cls()) for n, (cls, _) in TARGETS.items()]
    cases += [([f"task={n}"], "task", cls()) for n, (cls, _) in TASKS.items()]
    for overrides, key, library in cases:
        composed = OmegaConf.to_container(OmegaConf.select(compose(overrides), key))
        for f in dataclasses.fields(library):
            if f.name in composed and f.name != "generation_steps":  # the CLI's null means generate.steps
                value = getattr(library, f.name)
                assert composed[f.name] == (list(value) if isinstance(value, tuple) else value), (key, f.name)


def _out_of_range(meta):
    if meta.get("choices") is not None:
        numbers = all(isinstance(c, int) for c in meta["choices"])
        return max(meta["choices"]) + 1 if numbers else "no-such-choice"
    if meta.get("low") is not None:
        return meta["low"] - (0 if meta["low_open"] else 1)
    if meta.get("high") is not None:
        return meta["high"] + (0 if meta["high_open"] else 1)
    return None


def _ranged_keys(node, prefix=""):
    """(full key, field metadata, current value) of every key of a composed config that has a range."""
    from omegaconf import DictConfig

    kind = OmegaConf.get_type(node)
    fields = {f.name: f for f in dataclasses.fields(kind)} if dataclasses.is_dataclass(kind) else {}
    for key in node:
        value = node[key]
        if isinstance(value, DictConfig):
            yield from _ranged_keys(value, f"{prefix}{key}.")
        elif key in fields and _out_of_range(fields[key].metadata) is not None:
            yield f"{prefix}{key}", fields[key].metadata, value


def test_every_range_is_enforced_naming_the_key():
    """For every key with a range or choices, in the config of every group option, one bad value is
    refused by the composition check with the key's full name."""
    from omegaconf import ListConfig

    checked = set()
    for group, options in GROUPS.items():
        for name in options:
            cfg = compose([f"{group}={name}"])
            for key, meta, value in _ranged_keys(cfg):
                if f"{group}={name}:{key}" in checked or (not key.startswith(group) and key in checked):
                    continue
                bad = _out_of_range(meta)
                broken = copy.deepcopy(cfg)
                OmegaConf.update(broken, key, [bad] if isinstance(value, ListConfig) or meta.get("each") else bad)
                with pytest.raises(SynthNetError, match=f"^{key.replace('.', '[.]')} must be"):
                    check_ranges(broken)
                checked.add(key if not key.startswith(group) else f"{group}={name}:{key}")
    assert len(checked) > 100, len(checked)


@pytest.mark.parametrize("override, message", [
    ("zoo.batch_size=abc", "zoo.batch_size must be an integer, got 'abc'"),
    ("generate.noise_scale=x", "generate.noise_scale must be a number, got 'x'"),
    ("evaluate.prune_fractions=[0.5,2]", "evaluate.prune_fractions must be in [0, 1], got [0.5, 2.0]"),
    ("evaluate.steps=0", "evaluate.steps must be >= 1, got 0"),
    ("train.resume=maybe", "train.resume"),
    ("+zoo.typo=1", "unknown config key 'zoo.typo'"),
    ("method.imitation.nope=1", "unknown config key 'method.imitation.nope'"),
    ("generator.predict=sideways", "generator.predict must be one of delta, direct, got 'sideways'"),
])
def test_composition_refuses_a_bad_override_naming_the_key(override, message):
    with pytest.raises(SynthNetError) as info:
        compose([override])
    assert message in str(info.value) and len(str(info.value).splitlines()) == 1


def test_synthnet_config_prints_every_key_with_its_help(capsys):
    from synthnet.cli import main

    assert main(["config", "method=grpo", "method.iterations=7"]) == 0
    out = capsys.readouterr().out
    assert "  iterations: 7  # GRPO iterations" in out
    assert "lr: null  # Adam learning rate for the policy; null = 1e-4 (grpo), 1e-3 (es) or 1e-2 (latent)" in out
    assert out == describe(compose(["method=grpo", "method.iterations=7"]))
