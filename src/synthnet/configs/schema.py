"""The typed config: every key SynthNet reads, with its type, default, range and meaning, written once.

Hydra structured configs. The root (:class:`SynthNetConfig`) holds the command sections (paths, zoo,
train, generate, evaluate); each config group option (``target=mlp``, ``method=task``, ...) is a
dataclass registered in Hydra's ConfigStore. Library options come from the library's own classes
(:data:`synthnet.targets.TARGETS`, :data:`synthnet.tasks.TASKS`, :data:`synthnet.methods.rewards.REWARDS`,
the methods' ``*Settings``, the zoo's ``Recipe``, the generators' constructors), so their defaults and
ranges exist once. The packaged YAML only selects (``config.yaml``) and overrides (``experiment/``).

Composition refuses a wrong type (OmegaConf) or a value out of range (:func:`check_ranges`) with the
key's full name. ``synthnet config`` prints the composed config with each key's help as a comment.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from dataclasses import dataclass, field
from typing import Any, List, Optional

from omegaconf import II, MISSING, DictConfig, ListConfig, OmegaConf

from synthnet.errors import SynthNetError
from synthnet.options import check_value, help_of, option

# --------------------------------------------------------------------------- deriving schemas


def _omegaconf_type(annotation: Any) -> Any:
    """A type OmegaConf 2.3 accepts: ``X | None`` -> ``Optional[X]``, tuples -> lists, other unions -> Any."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return Optional[_omegaconf_type(rest[0])]
        return Any
    if origin in (list, tuple, List):
        element = args[0] if args else Any
        return List[_omegaconf_type(element)]
    return annotation


def _copy(f: dataclasses.Field, annotation: Any) -> tuple[str, Any, dataclasses.Field]:
    if f.default_factory is not dataclasses.MISSING:
        default = field(default_factory=f.default_factory, metadata=f.metadata)
    else:
        value = list(f.default) if isinstance(f.default, tuple) else f.default
        default = field(default_factory=lambda v=value: list(v), metadata=f.metadata) if isinstance(value, list) \
            else field(default=value, metadata=f.metadata)
    return f.name, _omegaconf_type(annotation), default


def structured(cls_name: str, name: str | None, library: type | None = None, *, drop: tuple[str, ...] = (),
               before: list | None = None, after: list | None = None, replace: dict | None = None,
               doc: str = "") -> type:
    """A mutable dataclass for Hydra: ``name`` first (group options only), then ``before``, ``library``'s
    fields (minus ``drop``, with ``replace``'s entries swapped in), then ``after``. Extra entries are
    ``(key, type, option(...))``."""
    entries = [] if name is None else [("name", str, field(default=name, metadata={"help": "this group option"}))]
    entries += before or []
    if library is not None:
        hints = typing.get_type_hints(library)
        for f in dataclasses.fields(library):
            if f.name in drop:
                continue
            entries.append((replace or {}).get(f.name) or _copy(f, hints[f.name]))
    entries += after or []
    schema = dataclasses.make_dataclass(cls_name, entries)
    schema.__doc__ = doc or (library.__doc__ if library is not None else cls_name)
    return schema


# generator options: defaults come from the constructor; help and ranges are written here
_GENERATOR_OPTIONS: dict[str, tuple[str, dict]] = {
    "chunk_size": ("values per token (tokenizer); rows longer than this span several tokens", dict(low=1, high=4096)),
    "bias_chunk": ("each bias alone in a token of its own (tokenizer): its place no longer moves with the fan-in, "
                   "which lets a generator serve other widths (MNIST-1D MLP, README limits); false in files "
                   "written before it existed", {}),
    "d_model": ("width of token, latent and expert features", dict(low=1, high=1 << 16)),
    "num_latents": ("size of the latent array", dict(low=1, high=1024)),
    "num_blocks": ("latent self-attention + MoE blocks", dict(low=1, high=1024)),
    "num_heads": ("attention heads (must divide d_model)", dict(low=1, high=1024)),
    "ff_multiplier": ("expert / feed-forward hidden width = ff_multiplier * d_model", dict(low=1, high=64)),
    "num_experts": ("experts per MoE layer (1 = a plain feed-forward)", dict(low=1, high=1024)),
    "top_k": ("experts each latent is routed to", dict(low=1, high=1024)),
    "time_dim": ("sinusoidal features per time input (t_source, t_target, gap); even", dict(low=2, high=1 << 16)),
    "condition_dim": ("width of an extra condition vector (0 = none)", dict(low=0, high=1 << 16)),
    "predict": ("delta: output = input + prediction (residual) | direct: output = prediction",
                dict(choices=("delta", "direct"))),
    "neuron_messages": ("pass information along real connections (hidden neuron <-> its outgoing weights)", {}),
    "message_rank": ("rank of the bilinear per-connection update", dict(low=1, high=1 << 16)),
    "max_output_units": ("largest number of classes (read-out rows carry their class index)",
                         dict(low=1, high=1 << 16)),
    "balance_loss_weight": ("Switch load-balancing loss weight", dict(low=0)),
    "z_loss_weight": ("router z-loss weight", dict(low=0)),
    "decoder_depth": ("cross-attention layers of the per-token decoder", dict(low=1, high=64)),
    "decoder_messages": ("neuron messages in the decoder as well", {}),
    "probes": ("learned probe inputs the generated networks are run on, each neuron described by its responses "
               "(0 = off)", dict(low=0, high=1024)),
    "probe_values": ("values per probe input (at least the task's input size)", dict(low=1, high=1 << 16)),
    "row_mean_scaling": ("scale the part of a neuron's weight update shared by all its incoming weights by "
                         "1/sqrt(fan_in) (wide layers: keeps one step from shifting a whole layer below zero)", {}),
    "latent_dim": ("size of a per-network latent z that shifts the conditioning (0 = none); method=grpo "
                   "method.algorithm=latent adds it to a trained generator", dict(low=0, high=1024)),
    "depth_feature": ("what a token's depth feature says: relative (layer index / (layers - 1)) | role (first "
                      "layer 0, read-out 1, every layer between 0.5: a deeper network's extra layers look like "
                      "the hidden-to-hidden layers seen in training; equal to relative for one or two hidden layers)",
                      dict(choices=("relative", "role"))),
    "set_rows": ("read and write the rows fed by hidden units (MLP layers after the first) as sets: order-free row "
                 "statistics and a forward sweep in, a backward sweep from the read-out, one MLP per connection out; no "
                 "value sits in a fixed slot, so hidden permutations permute the output exactly and widths and depths "
                 "transfer (README Families; needs neuron_messages; train it with row_mean_scaling)", {}),
    "hidden": ("MLP width", dict(low=1, high=1 << 16)),
    "num_layers": ("hidden layers", dict(low=1, high=1024)),
}


def _generator_schema(cls_name: str, name: str, constructor: type, doc: str) -> type:
    hints = typing.get_type_hints(constructor.__init__)
    entries = [("chunk_size", int, option(64, _GENERATOR_OPTIONS["chunk_size"][0], **_GENERATOR_OPTIONS["chunk_size"][1])),
               ("bias_chunk", bool, option(False, _GENERATOR_OPTIONS["bias_chunk"][0]))]
    for key, parameter in inspect.signature(constructor.__init__).parameters.items():
        if key in ("self", "chunk_size", "num_values"):
            continue
        text, ranges = _GENERATOR_OPTIONS[key]
        entries.append((key, _omegaconf_type(hints.get(key, Any)), option(parameter.default, text, **ranges)))
    return structured(cls_name, name, after=entries, doc=doc)


# --------------------------------------------------------------------------- the command sections


@dataclass
class Paths:
    """Where everything is read and written."""

    root: str = option("runs", "everything lives under here")
    data_dir: str = option("${paths.root}/data", "datasets, apart from targets")
    target_dir: str = option("${paths.root}/${task.name}-${target.name}", "one folder per target on a task")
    checkpoints_dir: str = option("${paths.target_dir}/checkpoints", "the zoo")
    generated_dir: str = option("${paths.target_dir}/generated", "synthesized networks")
    generators_dir: str = option("${paths.target_dir}/generators", "trained generators (.safetensors)")
    reports_dir: str = option("${paths.target_dir}/reports", "evaluation reports and plots")


@dataclass
class Pipeline:
    """``synthnet pipeline``."""

    stages: List[str] = option(["zoo", "train", "generate", "evaluate"], "commands run in order",
                               choices=("zoo", "train", "generate", "evaluate"), each=True)


def _zoo_schema() -> type:
    from synthnet.zoo.training import Recipe

    before = [
        ("runs", int, option(1024, "training runs (distinct seeds); the generator needs many to generalise to new "
                                   "inits (digits MLP, 4 steps: 32 runs -> ~55%, 1024 -> ~86% test)", low=1)),
        ("first_seed", int, option(0, "seeds are first_seed .. first_seed + runs - 1", low=0))]
    after = [("group_size", Optional[int], option(None, "runs trained together as one vmapped computation; null = "
                                                        "8 for MLPs, 1 for CNNs (bench/zoo_speed.py: vmap pays 13x "
                                                        "for MLPs, loses for convs)", low=1)),
             ("family_widths", list[int], option([], "a zoo over a family of architectures: each run's hidden widths "
                                                    "(mlp: target.hidden entries; cnn: target.channels) drawn from "
                                                    "this list by its seed, its own config in its header; [] = no "
                                                    "family", low=1, high=1 << 16, each=True)),
             ("family_depths", list[int], option([], "... and its number of those layers from this list", low=1,
                                                    high=64, each=True))]
    return structured("Zoo", None, Recipe, before=before, after=after,
                      doc="`synthnet zoo`: the training runs the generator learns from.")


Zoo = _zoo_schema()


@dataclass
class Train:
    """``synthnet train``: where the generator goes and what happens to an earlier one."""

    output: Optional[str] = option(None, "generator file; a bare file name goes in ${paths.generators_dir}, a path "
                                         "with a folder is taken as it is; null = ${paths.generators_dir}/"
                                         "{generator.name}-{method.name}.safetensors")
    resume: bool = option(True, "continue from the last save (same settings), skip if already trained")
    overwrite: bool = option(False, "replace a finished generator trained with other settings (else: refused)")


@dataclass
class Generate:
    """``synthnet generate``: networks from fresh inits."""

    count: int = option(32, "networks to generate", low=1)
    steps: int = option(4, "generation steps from the init (t = 0) to t = 1", low=1)
    first_seed: int = option(1_000_000, "init seeds; the zoo never uses seeds this large", low=0)
    generator: Optional[str] = option(None, "generator file; null = ${paths.generators_dir}/"
                                            "{generator.name}-{method.name}.safetensors")
    noise_scale: float = option(0.0, "> 0: stochastic sampling around each prediction (std in token units)",
                                low=0)
    prune: Optional[float] = option(None, "write networks with this fraction of their weights zeroed (smallest "
                                          "magnitudes of the whole network, exact count; biases kept); null = "
                                          "dense", low=0, high=1)
    bits: Optional[int] = option(None, "write networks quantized to this many bits (round to nearest, one scale "
                                       "per output channel, after pruning; 8 = int8, 4 = int4); null = float32",
                                 low=2, high=16)


@dataclass
class Evaluate:
    """``synthnet evaluate``: generated networks beside SGD twins from the same inits and the baselines."""

    first_seed: int = option(2_000_000, "init seeds for evaluation (disjoint from zoo and generate)", low=0)
    count: int = option(16, "networks per generator and SGD twins (one per init seed, the same inits)", low=1)
    steps: int = option(II("generate.steps"), "generation steps of every generator", low=1)
    generators: Optional[List[str]] = option(None, "generator files; null = every *.safetensors in "
                                                   "paths.generators_dir; [] = none")
    twin_checkpoints: int = option(50, "checkpoints per twin run: the time grid of time-to-accuracy", low=1)
    novelty_pool: str = option("final", "zoo checkpoints for weight-space novelty: final | all (every step > 0)",
                               choices=("final", "all"))
    average_size: int = option(16, "zoo finals averaged by the average baselines", low=1)
    zoo_rows: int = option(64, "zoo finals scored against the other runs (the zoo-vs-zoo row; each costs one "
                               "Hungarian matching per pool member, so all 1,024 would take minutes)", low=1)
    noise_scales: List[float] = option([0.1, 0.5], "noise baselines: std as a multiple of each tensor's RMS",
                                       low=0, each=True)
    insensitive_below: float = option(0.1, "flag a generator whose output spread / twin spread falls below this",
                                      low=0)
    collapse_below: float = option(1.0, "flag as collapsed when both input-sensitivity and diversity ratios fall "
                                         "below this (outputs less tied to their inits and less diverse than SGD)",
                                   low=0)
    prune_fractions: List[float] = option([0.5, 0.8, 0.9], "pruned test accuracy after zeroing these fractions of "
                                                      "weights", low=0, high=1, each=True)
    architectures: List[Any] = option([], "held-out architectures, each scored beside SGD twins of its own from "
                                          "the same inits: a list of widths for the target's width key (MLP "
                                          "hidden, CNN channels), e.g. [[48],[32,32]], or a mapping of target "
                                          "keys, e.g. [{channels: [64,64], kernel_size: [5,3]}]; [] = none")
    timing_repeats: int = option(3, "generation is timed this many times (median); twins train once", low=1)
    quantize_bits: List[int] = option([8, 4], "quantized test accuracy at these bit widths (round to nearest, one "
                                              "scale per output channel, biases kept) for every generator and the "
                                              "twins", low=2, high=16, each=True)


@dataclass
class SynthNetConfig:
    """The root: the group options (chosen in ``config.yaml``'s defaults) and the command sections."""

    target: Any = MISSING
    task: Any = MISSING
    generator: Any = MISSING
    method: Any = MISSING
    reward: Any = MISSING
    seed: int = option(0, "seed for everything not covered by a more specific seed", low=0)
    device: str = option("cpu", "torch device string for training and scoring")
    progress: bool = option(True, "tqdm progress bars")
    allow_large: bool = option(False, "go ahead with work estimated not to fit in memory or on disk")
    paths: Paths = field(default_factory=Paths)
    pipeline: Pipeline = field(default_factory=Pipeline)
    zoo: Zoo = field(default_factory=Zoo)
    train: Train = field(default_factory=Train)
    generate: Generate = field(default_factory=Generate)
    evaluate: Evaluate = field(default_factory=Evaluate)


# --------------------------------------------------------------------------- the group options


def _method_schemas() -> dict[str, type]:
    from synthnet.methods.es import ESSettings
    from synthnet.methods.grpo import GRPOSettings
    from synthnet.methods.imitation import ImitationSettings
    from synthnet.methods.latent import LatentSettings
    from synthnet.methods.task import TaskSettings

    imitation = structured(
        "ImitationMethod", "imitation", ImitationSettings, drop=("seed",),
        before=[("runs", Optional[int], option(None, "zoo runs to use (the first N by seed); null = all", low=1)),
                ("val_runs", int, option(4, "runs held out whole for validation (split by seed, never by "
                                            "checkpoint)", low=0))],
        doc="Imitation: learn W_t1 -> W_t2 from ordered checkpoint pairs of the same zoo run.")
    curriculum = [
        ("source", Optional[str], option(None, "generator file to start from; null = <generators_dir>/"
                                               "<generator>-imitation.safetensors")),
        ("imitation_first", bool, option(True, "train imitation first (method.imitation) when that default file "
                                               "is missing"))]
    stage = ("imitation", imitation, field(default_factory=imitation, metadata={
        "help": "the imitation stage's settings, used when its generator file is missing"}))
    task = structured(
        "TaskMethod", "task", TaskSettings, drop=("seed",),
        before=curriculum + [
            ("start", str, option("imitation", "imitation: start from (and anchor to) the imitation generator | "
                                               "fresh: a new generator anchored to itself (writes "
                                               "<generator>-task-fresh)", choices=("imitation", "fresh"))),
            ("from_scratch", bool, option(False, "ablation: a fresh generator, no imitation, no anchor (collapses; "
                                                 "evaluation flags it)"))],
        replace={"generation_steps": ("generation_steps", Optional[int], option(
            None, "sampler steps unrolled with gradients; null = generate.steps", low=1))},
        after=[("first_seed", int, option(4_000_000, "training inits: first_seed + step * inits_per_step + i",
                                          low=0)),
               ("val_inits", int, option(16, "held-out inits for selection", low=1)),
               ("val_first_seed", int, option(5_000_000, "their seeds", low=0)),
               ("family_widths", list[int], option([], "train over a family of architectures: every step draws each "
                                                      "hidden width (mlp: target.hidden entries; cnn: "
                                                      "target.channels) from this list; [] = no family",
                                                      low=1, high=1 << 16, each=True)),
               ("family_depths", list[int], option([], "... and the number of those layers from this list "
                                                      "(method.start=fresh, or imitation on a zoo over the same "
                                                      "family)", low=1, high=64, each=True)),
               stage],
        doc="Task loss: train the generator through the networks it generates (imitation first).")
    es_hints = typing.get_type_hints(ESSettings)
    latent_hints = typing.get_type_hints(LatentSettings)
    grpo = structured(
        "GRPOMethod", "grpo", GRPOSettings, drop=("steps",),
        before=curriculum + [
            ("iterations", int, option(100, "GRPO iterations (each: rollouts, rewards, inner epochs of updates)",
                                       low=1)),
            ("generation_steps", Optional[int], option(None, "generation steps of the policy; null = "
                                                             "generate.steps", low=1))],
        replace={"noise_scale": ("noise_scale", Any, option(
            [0.1], "algorithm=grpo: sigma of the stochastic steps, in token units; a number for every step, a list "
                   "for the first steps (the rest deterministic)", low=0, each=True))},
        after=[("lr", Optional[float], option(None, "Adam learning rate for the policy; null = 1e-4 (grpo), 1e-3 "
                                                    "(es) or 1e-2 (latent)", low=0, high=10, low_open=True)),
               ("weight_decay", float, option(0.0, "Adam weight decay", low=0, high=1)),
               ("first_seed", int, option(3_000_000, "init seeds: first_seed + iteration * B + i", low=0)),
               ("log_every", int, option(1, "one log line every N iterations", low=1)),
               ("save_every", int, option(10, "write the resumable state every N iterations", low=1)),
               ("scoring", str, option("batched", "batched (vmap over candidates) | loop; bench/grpo.py measures "
                                                  "both", choices=("batched", "loop"))),
               ("algorithm", str, option("es", "grpo: policy gradient over Gaussian noise on the sampled weights "
                                                 "(method.noise_scale) | es: evolution strategies on the generator's "
                                                 "parameters, every candidate deterministic as generate makes it "
                                                 "(method.population, method.sigma) | latent: policy gradient over a "
                                                 "k-dimensional latent per network that shifts the generator's "
                                                 "conditioning (method.latent_dim, method.latent_sigma)",
                                        choices=("grpo", "es", "latent")))]
              + [_copy(f, es_hints[f.name]) for f in dataclasses.fields(ESSettings) if f.name in ("population", "sigma")]
              + [_copy(f, latent_hints[f.name]) for f in dataclasses.fields(LatentSettings)
                 if f.name in ("latent_dim", "latent_sigma")]
              + [stage],
        doc="GRPO: reinforcement learning of an imitation-trained generator on a reward (configs: reward=).")
    return {"imitation": imitation, "task": task, "grpo": grpo}


def _library_groups() -> dict[str, dict[str, type]]:
    from synthnet.generators.flat_mlp import FlatMLPGenerator
    from synthnet.generators.perceiver_moe import PerceiverMoEGenerator
    from synthnet.methods.rewards import REWARDS
    from synthnet.targets import TARGETS
    from synthnet.tasks import TASKS

    def camel(text: str) -> str:
        return "".join(part.capitalize() for part in text.split("_"))

    return {
        "target": {n: structured(f"{camel(n)}Target", n, cls) for n, (cls, _) in TARGETS.items()},
        "task": {n: structured(f"{camel(n)}Task", n, cls) for n, (cls, _) in TASKS.items()},
        "reward": {n: structured(f"{camel(n)}Reward", n, cls) for n, (cls, _) in REWARDS.items()},
        "generator": {
            "perceiver_moe": _generator_schema(
                "PerceiverMoE", "perceiver_moe", PerceiverMoEGenerator,
                "Perceiver IO + Mixture-of-Experts: tokens cross-attend into latents, latent self-attention with "
                "routed experts, each token queries the latents for its output."),
            "flat_mlp": _generator_schema(
                "FlatMLP", "flat_mlp", FlatMLPGenerator,
                "The proof of concept's flat denoiser (the baseline): every weight in one vector, through an "
                "MLP; tied to one architecture."),
        },
        "method": _method_schemas(),
    }


GROUPS: dict[str, dict[str, type]] = _library_groups()


def register() -> None:
    """Put the root schema and every group option into Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="synthnet", node=SynthNetConfig)
    for group, options in GROUPS.items():
        for name, node in options.items():
            store.store(group=group, name=name, node=node)


# --------------------------------------------------------------------------- checks and help


def check_ranges(cfg: DictConfig, prefix: str = "") -> None:
    """Refuse any key of ``cfg`` (composed and resolved) the schema does not declare (``+zoo.typo=1``
    adds one) and any value outside its field's range, naming the key."""
    kind = OmegaConf.get_type(cfg)
    fields = {f.name: f for f in dataclasses.fields(kind)} if dataclasses.is_dataclass(kind) else {}
    for key in cfg:
        if fields and key not in fields:
            raise SynthNetError(f"unknown config key '{prefix}{key}' (a typo? `synthnet config` prints every key)")
        value = cfg[key]
        if isinstance(value, DictConfig):
            check_ranges(value, f"{prefix}{key}.")
        elif key in fields:
            plain = OmegaConf.to_container(value) if isinstance(value, ListConfig) else value
            check_value(f"{prefix}{key}", plain, fields[key].metadata)


def describe(cfg: DictConfig) -> str:
    """``cfg`` as YAML, each key followed by its help as a comment."""
    import yaml

    lines: list[str] = []

    def walk(node: DictConfig, indent: str) -> None:
        kind = OmegaConf.get_type(node)
        fields = {f.name: f for f in dataclasses.fields(kind)} if dataclasses.is_dataclass(kind) else {}
        for key in node:
            value = node[key]
            text = help_of(fields[key]) if key in fields else ""
            if isinstance(value, DictConfig):
                doc = (OmegaConf.get_type(value).__doc__ or "").strip().splitlines()
                lines.append(f"{indent}{key}:" + (f"  # {doc[0]}" if doc else ""))
                walk(value, indent + "  ")
                continue
            plain = OmegaConf.to_container(value) if isinstance(value, ListConfig) else value
            rendered = yaml.safe_dump(plain, default_flow_style=True, width=1 << 16).strip()
            rendered = rendered[:-4].strip() if rendered.endswith("\n...") else rendered.removesuffix("...").strip()
            lines.append(f"{indent}{key}: {rendered}" + (f"  # {text}" if text else ""))

    walk(cfg, "")
    return "\n".join(lines) + "\n"
