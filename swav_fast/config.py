"""Typed configuration: dataclasses, YAML recipes and ``section.key=value`` overrides.

A config is :class:`Config`; recipes in ``swav_fast/recipes/*.yaml`` (or any YAML path) give values
for some of its fields. Unknown keys and wrong types are rejected with the list of valid keys;
impossible combinations are rejected by :meth:`Config.validate` before any work starts.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from pipelines.options import (BUILTIN_OPTIONS, BackendOptions, DaliOptions, FfcvOptions, PilOptions,
                               TorchOptions)
from pipelines.spec import MultiCropSpec
from swav_fast.errors import ConfigError
from swav_fast.methods.configs import MethodsConfig, SwAVConfig  # noqa: F401 (SwAVConfig: old import path)

#: a decimal number written in exponent form without a dot (5e-4), which YAML 1.1 reads as a string
_FLOAT_TEXT = re.compile(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+")

log = logging.getLogger("swav_fast")

RECIPE_DIR = Path(__file__).parent / "recipes"
#: old dotted key -> the key(s) it moved to: still read (into each new key), with a deprecation message.
#: A new key given as well wins over the old one.
RENAMED_KEYS: dict[str, tuple[str, ...]] = {
    "data.prefetch": ("data.torch.prefetch", "data.dali.prefetch"),
    "data.hw_decoder_load": ("data.dali.hw_decoder_load",),
}
#: ``train.on_checkpoint_error``: what a failed checkpoint write does (the previous one stays intact).
CHECKPOINT_ERROR_POLICIES = ("stop", "continue")
DIVERGENCE_POLICIES = ("stop", "rollback")
#: ``optim.lr_scaling``: how the learning rates follow the global batch (see :meth:`OptimConfig.lr_factor`).
LR_SCALING_RULES = ("none", "linear", "sqrt")


@dataclass
class ModelConfig:
    arch: str = "resnet50"
    # the projector's sizes; null = the method's own (the paper's ResNet-50 head, declared by the method:
    # SwAV 2048-128, BYOL 4096-256, Barlow Twins 8192-8192, ...; swav_fast.methods.head_sizes)
    hidden_dim: Optional[int] = None
    feat_dim: Optional[int] = None
    num_prototypes: int = 3000
    sync_bn: bool = False


@dataclass
class OptimConfig:
    epochs: int = 100
    batch_size: int = 64  # per process
    base_lr: float = 4.8
    final_lr: float = 0.0048
    warmup_epochs: float = 10
    start_warmup: float = 0.3
    momentum: float = 0.9
    weight_decay: float = 1e-6
    lars: bool = True
    trust_coefficient: float = 0.001
    # biases and norm weights skip LARS adaptation and weight decay: true, false, or auto = the convention
    # of the method's official code (SwAV, InstDisc, MoCo v2, SimSiam: false; the others: true)
    exclude_bias_and_norm: Union[bool, str] = "auto"
    # -- global batch and learning-rate scaling (multi-process) -------------------------------------
    global_batch_size: int = 0  # > 0: batch_size = global_batch_size / world size (must divide); 0 = unused
    lr_scaling: str = "none"  # none | linear | sqrt: base_lr, final_lr, start_warmup x f(global / reference)
    reference_batch: int = 0  # the global batch the learning rates are given for (0 = not stated)

    def __post_init__(self) -> None:
        if self.exclude_bias_and_norm not in (True, False, "auto"):
            raise ConfigError(f"optim.exclude_bias_and_norm={self.exclude_bias_and_norm!r} must be true, "
                              "false or auto (the method's own convention)")

    def lr_factor(self, world_size: int = 1) -> float:
        r"""Multiplier of ``base_lr``, ``final_lr`` and ``start_warmup`` at global batch
        :math:`B` = ``global_batch_size`` when set, else :math:`\text{batch\_size} \times \text{world}`:
        ``none`` 1, ``linear``
        :math:`B / B_{ref}`, ``sqrt`` :math:`\sqrt{B / B_{ref}}` (:math:`B_{ref}` = ``reference_batch``)."""
        if self.lr_scaling == "none":
            return 1.0
        ratio = (self.global_batch_size or self.batch_size * world_size) / self.reference_batch
        return ratio if self.lr_scaling == "linear" else ratio ** 0.5


@dataclass
class SyntheticConfig:
    """The built-in dataset, generated once into ``cache_dir`` when ``data.path`` is empty."""
    train_images: int = 2000
    val_images: int = 500
    classes: int = 10
    size: list[int] = field(default_factory=lambda: [500, 375])
    seed: int = 0
    cache_dir: str = "~/.cache/swav-fast"
    kind: str = "photo"  # photo | shapes (swav_fast.data.synthetic.KINDS)


@dataclass
class DataConfig:
    """The data: where, which loader backend, its views; ``data.<backend>.*`` are each backend's own
    options (:mod:`pipelines.options`, where their defaults live); only the chosen one is used."""
    path: Optional[str] = None  # ImageFolder; None = built-in synthetic dataset
    loader: str = "pil"
    workers: int = 8
    crops: MultiCropSpec = field(default_factory=MultiCropSpec)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    pil: PilOptions = field(default_factory=PilOptions)
    torch: TorchOptions = field(default_factory=TorchOptions)
    dali: DaliOptions = field(default_factory=DaliOptions)
    ffcv: FfcvOptions = field(default_factory=FfcvOptions)

    def loader_options(self) -> BackendOptions | None:
        """The chosen backend's options object (``data.<loader>``); for a plug-in backend without a
        section, its registered options class's defaults (None when it takes no options)."""
        if self.loader in BUILTIN_OPTIONS:
            return getattr(self, self.loader)
        from pipelines.loader import backend_options_class

        cls = backend_options_class(self.loader)
        return cls() if cls is not None else None

    def validate_options(self) -> None:
        """Check every backend section's values again (they may have been set after parsing)."""
        for name in BUILTIN_OPTIONS:
            try:
                dataclasses.replace(getattr(self, name))
            except ConfigError as exc:
                raise ConfigError(f"data.{name}.{exc}") from None


@dataclass
class EvalConfig:
    knn_data: Optional[str] = None  # folder with train/ and val/ (default: the synthetic set)
    knn_k: int = 20
    knn_temperature: float = 0.07
    image_size: int = 224
    batch_size: int = 128
    at_end: bool = True  # kNN (trained vs random init) at the end of training
    knn_every_epochs: int = 0  # also kNN every N epochs during training (0 = never), logged


@dataclass
class TrainConfig:
    output_dir: str = "runs/swav"
    seed: int = 31
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    channels_last: bool = True  # GPU and CPU (oneDNN's convolutions are faster in NHWC on most CPUs)
    log_every: int = 10
    checkpoint_every_steps: int = 0  # 0 = only at epoch ends
    checkpoint_every_epochs: int = 1
    keep_checkpoints: int = 3
    max_steps: int = 0  # stop after this many steps (0 = run all epochs); the schedule is unchanged
    tensorboard: bool = False
    progress: bool = True
    threads: int = 0  # torch CPU threads (0 = auto: usable cores minus loader workers)
    method: str = "swav"  # self-supervised method (swav_fast.methods registry)
    step_mode: str = "eager"  # eager | compile (torch.compile + fused loss) | graph (CUDA graph)
    # -- fault handling (see swav_fast/guards.py) ---------------------------------------------
    max_nonfinite_steps: int = 10  # stop after this many consecutive NaN/inf steps (0 = never stop)
    collapse_patience: int = 0  # stop after this many consecutive collapsed log checks (0 = warn only)
    on_checkpoint_error: str = "stop"  # a failed checkpoint write: "stop" or "continue" (warn)
    debug_nan_steps: list[int] = field(default_factory=list)  # TESTING ONLY: NaN inputs at these steps
    # divergence (a loss far above its running mean, a weight norm far above its recent range; checked at
    # log steps and checkpoints, see swav_fast/guards.py DivergenceMonitor): "stop", or "rollback" to the
    # newest checkpoint from before it, skipping the batches since then
    on_divergence: str = "stop"  # after a divergence: stop, or rollback to the last healthy checkpoint
    max_rollbacks: int = 3  # rollbacks allowed in one run before it stops
    rollback_lr_factor: float = 1.0  # the learning rate is multiplied by this after each rollback
    divergence_loss_factor: float = 10.0  # loss > mean + factor * max(|mean|, std) of recent ones (0 = off)
    divergence_norm_factor: float = 10.0  # weight norm > factor * the largest recent one (0 = off)
    debug_blowup_steps: list[int] = field(default_factory=list)  # TESTING ONLY: weights x 1e6 before these


@dataclass
class DistConfig:
    """Multi-process training (the launcher, torchrun or srun, decides ranks and world size)."""
    backend: str = "auto"  # auto (nccl on GPUs, gloo on the CPU) | nccl | gloo
    timeout_minutes: float = 30.0  # collectives wait this long (rank 0 alone runs kNN and writes checkpoints)
    find_unused_parameters: bool = False  # DDP: for methods whose loss skips some parameters


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    methods: MethodsConfig = field(default_factory=MethodsConfig)  # the family's own settings

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self, world_size: int = 1) -> "Config":
        """Reject impossible values and combinations before any work; returns self.

        Pure: it reads the config and changes nothing (the per-process batch that
        ``optim.global_batch_size`` implies is :func:`per_process_batch`; :func:`resolve_batch` gives a
        config with it filled in), and it queries no registry (names of methods, loader backends, trunks
        and step modes are checked where the run is composed: :func:`swav_fast.run.check_config`)."""
        self._validate_choices()
        self._validate_ranges()
        self.data.validate_options()  # each backend section's values
        batch = per_process_batch(self, world_size)
        if batch < 1:
            raise ConfigError(f"optim.batch_size={batch} must be >= 1 (per process)")
        if self.optim.lr_scaling != "none" and self.optim.reference_batch < 1:
            raise ConfigError(f"optim.lr_scaling={self.optim.lr_scaling} needs optim.reference_batch (the "
                              "global batch base_lr is given for), e.g. optim.reference_batch=256")
        global_batch = batch * world_size
        queue = self.methods.swav.queue_length
        if queue:
            if queue % global_batch:
                lower = queue - queue % global_batch
                raise ConfigError(
                    f"methods.swav.queue_length={queue} must be a multiple of the global batch "
                    f"{global_batch} (optim.batch_size {batch} x world size {world_size}); "
                    f"try {lower or global_batch} or {lower + global_batch}")
        if self.optim.epochs < 1:
            raise ConfigError(f"optim.epochs={self.optim.epochs} must be >= 1")
        if self.optim.warmup_epochs > self.optim.epochs:
            raise ConfigError(f"optim.warmup_epochs={self.optim.warmup_epochs} exceeds optim.epochs="
                              f"{self.optim.epochs}")
        return self

    def _validate_choices(self) -> None:
        """Names from fixed lists: rejected with the valid ones listed (registry names: see
        :func:`swav_fast.run.check_choices`)."""
        choices = {
            "train.precision": (self.train.precision, ["auto", "fp32", "bf16", "fp16"]),
            "train.on_checkpoint_error": (self.train.on_checkpoint_error, list(CHECKPOINT_ERROR_POLICIES)),
            "train.on_divergence": (self.train.on_divergence, list(DIVERGENCE_POLICIES)),
            "optim.lr_scaling": (self.optim.lr_scaling, list(LR_SCALING_RULES)),
            "dist.backend": (self.dist.backend, ["auto", "nccl", "gloo"]),
            "data.synthetic.kind": (self.data.synthetic.kind, ["photo", "shapes"]),
        }
        for key, (value, valid) in choices.items():
            check_choice(key, value, valid)
        device = self.train.device
        if device not in ("auto", "cpu", "cuda") and not (device.startswith("cuda:") and device[5:].isdigit()):
            raise ConfigError(f"train.device={device!r} is not valid; valid: auto, cpu, cuda, cuda:N")

    def _validate_ranges(self) -> None:
        """Counts that must be positive (>= 1) or non-negative (>= 0)."""
        if self.model.feat_dim is not None and self.model.feat_dim < 1:
            raise ConfigError(f"model.feat_dim={self.model.feat_dim} must be >= 1 (or null: the method's "
                              "own)")
        if self.model.hidden_dim is not None and self.model.hidden_dim < 0:
            raise ConfigError(f"model.hidden_dim={self.model.hidden_dim} must be >= 0 (or null: the "
                              "method's own)")
        positive = {"model.num_prototypes": self.model.num_prototypes,
                    "train.log_every": self.train.log_every}
        non_negative = {"data.workers": self.data.workers, "train.max_steps": self.train.max_steps,
                        "train.checkpoint_every_steps": self.train.checkpoint_every_steps,
                        "train.checkpoint_every_epochs": self.train.checkpoint_every_epochs,
                        "train.keep_checkpoints": self.train.keep_checkpoints,
                        "train.max_nonfinite_steps": self.train.max_nonfinite_steps,
                        "train.collapse_patience": self.train.collapse_patience,
                        "train.max_rollbacks": self.train.max_rollbacks,
                        "train.divergence_loss_factor": self.train.divergence_loss_factor,
                        "train.divergence_norm_factor": self.train.divergence_norm_factor,
                        "optim.global_batch_size": self.optim.global_batch_size,
                        "optim.reference_batch": self.optim.reference_batch}
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"{key}={value} must be >= 1")
        for key, value in non_negative.items():
            if value < 0:
                raise ConfigError(f"{key}={value} must be >= 0")
        if self.dist.timeout_minutes <= 0:
            raise ConfigError(f"dist.timeout_minutes={self.dist.timeout_minutes} must be > 0")
        if not 0.0 < self.train.rollback_lr_factor <= 1.0:
            raise ConfigError(f"train.rollback_lr_factor={self.train.rollback_lr_factor} must be in (0, 1]")
        bad_steps = [s for s in self.train.debug_nan_steps if s < 0]
        if bad_steps:
            raise ConfigError(f"train.debug_nan_steps={self.train.debug_nan_steps}: steps must be >= 0")


def check_choice(key: str, value: str, valid: list[str]) -> None:
    """ConfigError ``key='value' is not valid; valid: ...`` unless ``value`` is one of ``valid``."""
    if value not in valid:
        raise ConfigError(f"{key}={value!r} is not valid; valid: {', '.join(valid)}")


def per_process_batch(cfg: Config, world_size: int = 1) -> int:
    r"""Images per step per process: ``optim.global_batch_size / world_size`` when the global batch is
    given (it must divide), else ``optim.batch_size``."""
    o = cfg.optim
    if not o.global_batch_size:
        return o.batch_size
    if o.global_batch_size % world_size:
        raise ConfigError(f"optim.global_batch_size={o.global_batch_size} is not divisible by the "
                          f"world size {world_size}; use a multiple of {world_size} or set "
                          "optim.batch_size (per process) instead")
    return o.global_batch_size // world_size


def resolve_batch(cfg: Config, world_size: int = 1) -> Config:
    """``cfg`` with ``optim.batch_size`` set to :func:`per_process_batch` (a new config when that changes
    it; ``cfg`` itself is never modified). What the run saves in config.yaml and its checkpoints."""
    batch = per_process_batch(cfg, world_size)
    if batch == cfg.optim.batch_size:
        return cfg
    return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, batch_size=batch))


# ----------------------------------------------------------------------------------------------
# dict / YAML <-> dataclass


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def valid_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """All dotted keys of a config class, e.g. ``optim.base_lr``."""
    keys = []
    hints = typing.get_type_hints(cls)
    for name in _fields(cls):
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            keys += valid_keys(tp, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert a YAML value to the annotated type; errors name the key."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for option in inner:  # the first type that takes the value (bool | str: true, false, "auto")
            try:
                return _coerce(value, option, key)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin is list:
        (elem,) = typing.get_args(tp) or (Any,)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(v, elem, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 5e-4 (no dot) as text; any user means the number
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {value!r}")
    return value


#: sections that moved: old top-level name -> new dotted place (read from the old place with a warning)
MOVED_SECTIONS: dict[str, str] = {"swav": "methods.swav"}


def _migrate_renamed_keys(data: dict[str, Any], source: str) -> dict[str, Any]:
    """``data`` with each key of :data:`RENAMED_KEYS` copied into its new key(s) (where not given) and
    removed, logging one deprecation line per key."""
    out = data
    for old, targets in RENAMED_KEYS.items():
        *path, leaf = old.split(".")
        node: Any = out
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            continue
        out = copy.deepcopy(out) if out is data else out
        parent = out
        for part in path:
            parent = parent[part]
        value = parent.pop(leaf)
        for new in targets:
            *new_path, new_leaf = new.split(".")
            dest: Any = out
            for part in new_path:
                child = dest.get(part)
                if child is None:
                    child = dest[part] = {}
                if not isinstance(child, dict):
                    break  # not a mapping: its own type error follows
                dest = child
            else:
                dest.setdefault(new_leaf, value)
        log.warning("deprecated config key in %s: %s moved to %s; the old name still loads", source, old,
                    " and ".join(targets))
    return out


def migrate_moved_keys(data: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """``data`` with the keys of :data:`MOVED_SECTIONS` moved to their new place (``swav.epsilon`` ->
    ``methods.swav.epsilon``), logging one deprecation line naming ``source`` (a recipe, an override,
    a checkpoint's saved config), and the single keys of :data:`RENAMED_KEYS` likewise (``data.prefetch``
    -> ``data.torch.prefetch`` and ``data.dali.prefetch``). Keys given at the new place in the same
    ``data`` win."""
    if not isinstance(data, dict):
        return data
    data = _migrate_renamed_keys(data, source)
    if not any(old in data for old in MOVED_SECTIONS):
        return data
    out = dict(data)
    for old, new in MOVED_SECTIONS.items():
        if old not in out:
            continue
        moved = out.pop(old)
        names = ", ".join(f"{old}.{k}" for k in moved) if isinstance(moved, dict) else old
        parts = new.split(".")
        node: dict[str, Any] = out
        for p in parts[:-1]:
            node[p] = dict(node.get(p) or {})
            node = node[p]
        current = node.get(parts[-1])
        if isinstance(moved, dict) and isinstance(current, dict):
            moved = _merge(moved, current)
        elif current is not None:
            moved = current
        node[parts[-1]] = moved
        log.warning("deprecated config keys in %s: %s moved to %s.* (%s); the old names still load",
                    source, f"{old}.*", new, names)
    return out


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a (nested) dict; unknown keys raise with the valid ones. For the
    whole :class:`Config`, keys of moved sections are read from their old place (with a warning)."""
    if data is None:
        data = {}
    if cls is Config and not prefix:
        data = migrate_moved_keys(data)
    hints = typing.get_type_hints(cls)
    known = _fields(cls)
    unknown = [k for k in data if k not in known]
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; valid keys under "
                          f"'{prefix.rstrip('.') or 'top level'}': {', '.join(known)}")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as exc:  # the class's own checks name the field; add where it is
        if prefix:
            raise ConfigError(f"{prefix}{exc}") from None
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {exc}") from exc


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def read_recipe(name_or_path: str) -> dict[str, Any]:
    """A recipe by name (``swav_fast/recipes/NAME.yaml``) or path; ``base:`` keys chain recipes."""
    path = Path(name_or_path)
    if not path.suffix:
        path = RECIPE_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(f"recipe {name_or_path!r} not found (a YAML path, or one of: "
                          f"{', '.join(available_recipes())})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {path} is not valid YAML: {yaml_problem(exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping of sections")
    base = data.pop("base", None)
    data = migrate_moved_keys(data, f"recipe {path}")
    return _merge(read_recipe(base), data) if base else data


def yaml_problem(exc: Exception) -> str:
    """One line for a YAML error: the problem and where (``line L, column C``), not PyYAML's multi-line
    excerpt of the file."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or str(exc).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{' '.join(str(problem).split())}"


def parse_override(text: str) -> dict[str, Any]:
    """``optim.base_lr=0.6`` -> ``{"optim": {"base_lr": 0.6}}`` (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    out: dict[str, Any] = {}
    node = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def load_config(recipe: str | None = None, overrides: list[str] | None = None,
                extra: dict[str, Any] | None = None) -> Config:
    """Recipe (or defaults) + dict ``extra`` + ``key=value`` overrides, type-checked."""
    data: dict[str, Any] = read_recipe(recipe) if recipe else {}
    if extra:
        data = _merge(data, migrate_moved_keys(extra))
    for o in overrides or []:
        data = _merge(data, migrate_moved_keys(parse_override(o), f"override {o!r}"))
    return from_dict(Config, data)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# ----------------------------------------------------------------------------------------------
# command-line overrides and key descriptions (``swav-fast train --list-keys``)

#: ``section.key=value`` (at least one dot before the ``=``): a config override on the command line
_OVERRIDE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+=")


def is_override(text: str) -> bool:
    """Whether a command-line word is a ``section.key=value`` override (wherever it appears)."""
    return bool(_OVERRIDE.match(text))


#: one-line descriptions of the keys whose field has no ``metadata["help"]`` and no inline comment
KEY_HELP: dict[str, str] = {
    "model.arch": "trunk: resnet18/34/50/101/152, resnet50w2/w4/w5, wide_resnet50_2, resnet10_half, ...",
    "model.hidden_dim": "width of the projection head's hidden layer (null = the method's own)",
    "model.feat_dim": "output size of the projection head, the embedding compared by the loss (null = the "
                      "method's own)",
    "model.num_prototypes": "SwAV: number of prototypes K",
    "model.sync_bn": "batch norm over the global batch under several processes (SyncBatchNorm)",
    "methods.swav.temperature": "SwAV: softmax temperature of the swapped prediction",
    "methods.swav.epsilon": "SwAV: entropy regularisation of the Sinkhorn-Knopp assignment",
    "methods.swav.sinkhorn_iterations": "SwAV: Sinkhorn-Knopp iterations per batch",
    "methods.swav.crops_for_assign": "SwAV: the views whose codes are computed (predicted from the others)",
    "methods.swav.epoch_queue_starts": "SwAV: the epoch from which the feature queue is used",
    "methods.swav.freeze_prototypes_niters": "SwAV: steps during which the prototypes get no gradient",
    "optim.epochs": "training epochs (the schedule's length)",
    "optim.base_lr": "peak learning rate, reached at the end of the warmup",
    "optim.final_lr": "learning rate at the end of the cosine schedule",
    "optim.warmup_epochs": "epochs of linear warmup from optim.start_warmup to optim.base_lr",
    "optim.start_warmup": "learning rate at step 0 (start of the warmup)",
    "optim.momentum": "SGD/LARS momentum",
    "optim.weight_decay": "L2 weight decay",
    "optim.lars": "LARS (layer-wise trust ratio) around SGD; false = plain SGD",
    "optim.trust_coefficient": "LARS trust coefficient eta",
    "optim.exclude_bias_and_norm": "no weight decay and no LARS adaptation for biases and norm weights "
                                   "(auto = the method's official convention)",
    "data.loader": "loader backend: pil | torch | dali | ffcv (swav-fast train --help lists installed ones)",
    "data.workers": "loader worker processes (pil, torch) or threads (dali)",
    "data.crops.num_crops": "views per crop group, global crops first (SwAV: [2, 6])",
    "data.crops.size_crops": "pixel size of each crop group's views",
    "data.crops.min_scale_crops": "RandomResizedCrop lower area scale, per crop group",
    "data.crops.max_scale_crops": "RandomResizedCrop upper area scale, per crop group",
    "data.crops.ratio": "RandomResizedCrop aspect-ratio range [low, high]",
    "data.crops.flip_p": "probability of a horizontal flip",
    "data.crops.jitter_strength": "colour jitter strength s: ColorJitter(0.8s, 0.8s, 0.8s, 0.2s)",
    "data.crops.jitter_p": "probability of colour jitter",
    "data.crops.grayscale_p": "probability of grayscale",
    "data.crops.blur_p": "probability of Gaussian blur",
    "data.crops.blur_sigma": "Gaussian blur sigma range [low, high]",
    "data.crops.solarize_p": "probability of solarisation (threshold 0.5)",
    "data.crops.mean": "normalisation mean per RGB channel",
    "data.crops.std": "normalisation standard deviation per RGB channel",
    "data.crops.dtype": "dtype of the views the loader delivers (float32, bfloat16, float16)",
    "data.crops.channels_last": "deliver the views in channels-last memory format",
    "data.synthetic.train_images": "built-in dataset: training images",
    "data.synthetic.val_images": "built-in dataset: validation images (the kNN queries)",
    "data.synthetic.classes": "built-in dataset: classes",
    "data.synthetic.size": "built-in dataset: image [width, height] in pixels",
    "data.synthetic.seed": "built-in dataset: random seed",
    "data.synthetic.cache_dir": "built-in dataset: folder it is generated into (once)",
    "data.synthetic.kind": "built-in dataset: photo (shape + texture families, colour random) or shapes "
                           "(one object whose shape is the class, all colours random; at most 14 classes)",
    "eval.knn_k": "kNN: neighbours k",
    "eval.knn_temperature": "kNN: temperature of the similarity-weighted vote",
    "eval.image_size": "kNN: centre-crop size of the evaluation images",
    "eval.batch_size": "kNN: batch size of feature extraction",
    "train.output_dir": "run folder: config.yaml, metrics.jsonl, checkpoints/",
    "train.seed": "random seed (data order, augmentations, initialisation)",
    "train.log_every": "steps between log records (loss, lr, images/s) in metrics.jsonl",
    "train.checkpoint_every_epochs": "write a checkpoint every N epochs (0 = never at epoch ends)",
    "train.keep_checkpoints": "checkpoints kept in the run folder (older ones are removed; 0 = keep all)",
    "train.tensorboard": "also write TensorBoard scalars to RUN/tensorboard",
    "train.progress": "show a progress bar",
    "methods.instdisc.temperature": "InstDisc: NCE temperature",
    "methods.instdisc.num_negatives": "InstDisc: noise samples drawn from the memory bank per sample",
    "methods.instdisc.memory_momentum": "InstDisc: momentum of the memory bank's updates",
    "methods.instdisc.z_momentum": "InstDisc: NCE normaliser Z; 1.0 = fixed after the first batch, below 1 "
                                   "a moving average",
    "methods.moco_v2.temperature": "MoCo v2: InfoNCE temperature",
    "methods.moco_v2.queue_length": "MoCo v2: negatives in the key queue",
    "methods.moco_v2.momentum": "MoCo v2: EMA momentum of the key encoder",
    "methods.moco_v2.projector_layers": "MoCo v2: layers of the projection MLP",
    "methods.moco_v3.temperature": "MoCo v3: InfoNCE temperature",
    "methods.moco_v3.base_momentum": "MoCo v3: EMA momentum of the key encoder at the start",
    "methods.moco_v3.final_momentum": "MoCo v3: EMA momentum at the end (cosine)",
    "methods.moco_v3.projector_layers": "MoCo v3: layers of the projection MLP",
    "methods.moco_v3.predictor_hidden_dim": "MoCo v3: hidden width of the predictor",
    "methods.simclr.temperature": "SimCLR: NT-Xent temperature",
    "methods.simclr.projector_layers": "SimCLR: layers of the projection MLP",
    "methods.byol.base_momentum": "BYOL: target EMA momentum at the start",
    "methods.byol.final_momentum": "BYOL: target EMA momentum at the end (cosine)",
    "methods.byol.projector_layers": "BYOL: layers of the projection MLP",
    "methods.byol.predictor_hidden_dim": "BYOL: hidden width of the predictor",
    "methods.simsiam.projector_layers": "SimSiam: layers of the projection MLP",
    "methods.simsiam.predictor_hidden_dim": "SimSiam: hidden width of the predictor (bottleneck)",
    "methods.barlow_twins.lambd": "Barlow Twins: weight of the off-diagonal (redundancy) term",
    "methods.barlow_twins.projector_layers": "Barlow Twins: layers of the projection MLP",
    "methods.dino.out_dim": "DINO: output size K of the head's last (weight-normalised) layer",
    "methods.dino.student_temp": "DINO: student softmax temperature",
    "methods.dino.teacher_temp": "DINO: teacher softmax temperature (after the warmup)",
    "methods.dino.warmup_teacher_temp": "DINO: teacher temperature at the start of its warmup",
    "methods.dino.center_momentum": "DINO: EMA momentum of the teacher's centre",
    "methods.dino.base_momentum": "DINO: teacher EMA momentum at the start",
    "methods.dino.final_momentum": "DINO: teacher EMA momentum at the end (cosine)",
    "methods.dino.projector_layers": "DINO: layers of the head MLP",
    "methods.dino.batch_norm": "DINO: batch norm in the head MLP",
    "methods.dino.norm_last_layer": "DINO: fix the norm of the last layer's weights",
    "methods.dino.freeze_last_layer_epochs": "DINO: epochs during which the last layer gets no gradient",
    # keys whose inline comment is a note rather than a description
    "optim.batch_size": "images per step per process (global batch = batch_size x processes)",
    "data.path": "training ImageFolder (or prepared dataset); null = the built-in synthetic dataset",
    "train.channels_last": "channels-last memory format for the model and views (GPU and CPU)",
    "train.checkpoint_every_steps": "also write a checkpoint every N steps (0 = only at epoch ends)",
    "train.threads": "torch CPU threads; 0 = auto: the usable cores (affinity, cgroup quota) minus loader "
                     "workers",
    "methods.instdisc.projector_layers": "InstDisc: layers of the projection (1 = the paper's linear layer)",
    "methods.instdisc.loss": "InstDisc: nce (noise samples, the paper's large-dataset choice) or softmax "
                             "(the exact non-parametric softmax over the whole bank)",
    "methods.moco_v2.symmetric": "MoCo v2: symmetric loss (false = the paper: queries from view 0, keys "
                                 "from view 1)",
    "methods.moco_v2.shuffle_bn_batch": "MoCo v2: key encoder's BN sub-batch on a shuffled batch (paper: 32 "
                                        "per GPU)",
    "methods.dino.clip_grad": "DINO: per-parameter gradient norm clip (0 = off)",
}


@dataclass
class KeyInfo:
    """One config key for ``--list-keys``: dotted name, type, default and a one-line description."""
    key: str
    type: str
    default: Any
    help: str

    def line(self, width: int = 40) -> str:
        return f"{self.key:<{width}} {self.type:<12} {_show(self.default):<14} {self.help}"


def _show(value: Any) -> str:
    """A default as it would be written on the command line (YAML, no spaces: true, null, [0.75,1.333])."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_show(v) for v in value) + "]"
    return str(value)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        inner = "|".join(_type_name(a) for a in args if a is not type(None))
        return f"{inner}|null" if type(None) in args else inner
    if origin is list:
        (elem,) = typing.get_args(tp) or (Any,)
        return f"list[{_type_name(elem)}]"
    return getattr(tp, "__name__", str(tp))


def _comments(cls: type) -> dict[str, str]:
    """The inline ``# comment`` of each field line in ``cls``'s source, or the ``#`` lines just above it."""
    import inspect

    try:
        try:
            lines = inspect.getsource(cls).splitlines()
        except SystemError:  # CPython 3.11's ast.parse may fail once with a spurious "AST constructor
            lines = inspect.getsource(cls).splitlines()  # recursion depth mismatch" (seen after DALI / numba)
    except (OSError, TypeError, SystemError):  # no source (e.g. a zipped install)
        return {}
    out: dict[str, str] = {}
    above: list[str] = []
    for line in lines:
        text = line.strip()
        if text.startswith("#"):
            above.append(text.lstrip("#:").strip())
            continue
        m = re.match(r"(\w+)\s*:[^#]*?(?:\s#:?\s*(.*))?$", text)
        if m and m.group(2):
            out[m.group(1)] = m.group(2).strip()
        elif m and above:
            out[m.group(1)] = " ".join(above)
        above = []
    return out


def describe_keys(cls: type = Config, prefix: str = "") -> list[KeyInfo]:
    """Every dotted key of ``cls`` with its type, default and description (field ``metadata["help"]``,
    else :data:`KEY_HELP`, else the field's comment in the source)."""
    out: list[KeyInfo] = []
    hints = typing.get_type_hints(cls)
    defaults = cls()
    comments = _comments(cls)
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            out += describe_keys(tp, f"{key}.")
            continue
        help_text = f.metadata.get("help") or KEY_HELP.get(key) or comments.get(f.name, "")
        out.append(KeyInfo(key, _type_name(tp), getattr(defaults, f.name), help_text))
    return out
