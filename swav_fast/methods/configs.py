"""Typed hyper-parameters of the method family, defaults as in each paper (ResNet-50, ImageNet).

The projector's width and output size come from ``model.hidden_dim`` / ``model.feat_dim`` and the
trunk from ``model.arch``; everything specific to one method is here, under ``methods.<name>``
(e.g. ``methods.byol.base_momentum=0.99`` on the command line). Values are checked when the
dataclass is built, so a bad override fails before any work with a message naming the key.

A method's settings are one dataclass here, declared with ``@method_section("<name>")``;
:class:`MethodsConfig` is made from the declared sections, so nothing else lists them. Why here and
not in the method's own file: the method files import torch, and the config layer (``--help``,
``train --list-keys``, argument errors, recipe and checkpoint loading) must not; Python cannot read
a dataclass out of a module without running the module's imports. So a method with settings of its
own touches two files: its method file under ``swav_fast/methods/`` (found automatically, see
``swav_fast.methods.method_modules``) and one decorated dataclass in this file.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, make_dataclass
from typing import Any, Callable

from swav_fast.errors import ConfigError


#: section name -> its dataclass, filled by :func:`method_section` (the fields of :class:`MethodsConfig`)
_SECTIONS: dict[str, type] = {}


def method_section(name: str) -> Callable[[type], type]:
    """Class decorator: the dataclass is the settings of ``methods.<name>`` (a field of ``MethodsConfig``)."""
    def register(cls: type) -> type:
        if name in _SECTIONS:
            raise ValueError(f"methods section {name!r} declared twice ({_SECTIONS[name].__name__}, {cls.__name__})")
        _SECTIONS[name] = cls
        return cls
    return register


def _check(section: str, obj: Any, positive: tuple[str, ...] = (), unit: tuple[str, ...] = (),
           at_least_one: tuple[str, ...] = (), non_negative: tuple[str, ...] = (),
           choices: dict[str, tuple[str, ...]] | None = None) -> None:
    """Raise ConfigError for the first field out of its range (or, for ``choices``, not among its values)."""
    for name, valid in (choices or {}).items():
        if getattr(obj, name) not in valid:
            raise ConfigError(f"methods.{section}.{name}={getattr(obj, name)!r} must be one of "
                              f"{', '.join(valid)}")
    for name in positive:
        if not getattr(obj, name) > 0:
            raise ConfigError(f"methods.{section}.{name}={getattr(obj, name)} must be > 0")
    for name in unit:
        if not 0.0 <= getattr(obj, name) <= 1.0:
            raise ConfigError(f"methods.{section}.{name}={getattr(obj, name)} must be in [0, 1]")
    for name in at_least_one:
        if getattr(obj, name) < 1:
            raise ConfigError(f"methods.{section}.{name}={getattr(obj, name)} must be >= 1")
    for name in non_negative:
        if getattr(obj, name) < 0:
            raise ConfigError(f"methods.{section}.{name}={getattr(obj, name)} must be >= 0")


@method_section("swav")
@dataclass
class SwAVConfig:
    """Caron et al. 2020 (ResNet-50, batch 4096): swapped prediction at T 0.1, Sinkhorn-Knopp with
    epsilon 0.05 and 3 iterations on the two global crops, no queue, prototypes frozen for the first
    epoch (313 iterations at batch 4096); ``model.num_prototypes`` K = 3000. Was the top-level
    ``swav`` section (still read, with a deprecation warning)."""
    temperature: float = 0.1
    epsilon: float = 0.05
    sinkhorn_iterations: int = 3
    crops_for_assign: list[int] = field(default_factory=lambda: [0, 1])
    queue_length: int = 0  # global queue length (split over ranks); 0 = no queue
    epoch_queue_starts: int = 15
    freeze_prototypes_niters: int = 313

    def __post_init__(self) -> None:
        _check("swav", self, positive=("temperature", "epsilon"), at_least_one=("sinkhorn_iterations",),
               non_negative=("queue_length", "epoch_queue_starts", "freeze_prototypes_niters"))


#: InstDisc's objectives (``methods.instdisc.loss``)
INSTDISC_LOSSES = ("nce", "softmax")


@method_section("instdisc")
@dataclass
class InstDiscConfig:
    """Wu et al. 2018: linear projection to ``feat_dim`` (128), NCE with 4096 noise samples."""
    temperature: float = 0.07
    num_negatives: int = 4096
    memory_momentum: float = 0.5
    memory_size: int = 0  # rows of the memory bank; 0 = the training set's size
    projector_layers: int = 1  # 1 = the paper's linear layer
    # NCE normaliser Z: 1.0 = estimated on the first batch, then fixed (the paper); below 1, a moving
    # average of per-batch estimates (needed on small datasets, where the bank fills within steps)
    z_momentum: float = 1.0
    # nce: NCE with num_negatives noise rows (the paper's choice for 1.28 M images); softmax: the exact
    # non-parametric softmax over every row of the bank (its eq. 2; affordable for a small training set,
    # where num_negatives and z_momentum are unused)
    loss: str = "nce"

    def __post_init__(self) -> None:
        _check("instdisc", self, choices={"loss": INSTDISC_LOSSES}, positive=("temperature",),
               unit=("z_momentum",),
               at_least_one=("num_negatives", "projector_layers"),
               non_negative=("memory_size",))
        if not 0.0 <= self.memory_momentum < 1.0:
            raise ConfigError(f"methods.instdisc.memory_momentum={self.memory_momentum} must be in [0, 1)")


@method_section("moco_v2")
@dataclass
class MoCoV2Config:
    """Chen et al. 2020: MLP projector (no BN), key encoder EMA 0.999, queue 65536, InfoNCE T 0.2."""
    temperature: float = 0.2
    queue_length: int = 65536
    momentum: float = 0.999
    projector_layers: int = 2
    symmetric: bool = False  # the paper: queries from view 0, keys from view 1 only
    shuffle_bn_batch: int = 32  # key encoder's BN sub-batch, on a shuffled batch (the paper: 32 per GPU)

    def __post_init__(self) -> None:
        _check("moco_v2", self, positive=("temperature",), unit=("momentum",),
               at_least_one=("queue_length", "projector_layers", "shuffle_bn_batch"))


@method_section("moco_v3")
@dataclass
class MoCoV3Config:
    """Chen, Xie & He 2021 (ResNet-50 recipe): projector and predictor MLPs 4096 wide with BN,
    momentum 0.99 -> 1 on a cosine, symmetric InfoNCE over the batch (no queue), T 1.0 (ViT: 0.2)."""
    temperature: float = 1.0
    base_momentum: float = 0.99
    final_momentum: float = 1.0
    projector_layers: int = 2
    predictor_hidden_dim: int = 4096

    def __post_init__(self) -> None:
        _check("moco_v3", self, positive=("temperature",), unit=("base_momentum", "final_momentum"),
               at_least_one=("projector_layers", "predictor_hidden_dim"))


@method_section("simclr")
@dataclass
class SimCLRConfig:
    """Chen et al. 2020: 2-layer projector with BN, NT-Xent (0.1 at batch 4096; 0.5 suits small batches)."""
    temperature: float = 0.1
    projector_layers: int = 2

    def __post_init__(self) -> None:
        _check("simclr", self, positive=("temperature",), at_least_one=("projector_layers",))


@method_section("byol")
@dataclass
class BYOLConfig:
    """Grill et al. 2020: projector and predictor 4096-BN-ReLU-256, target EMA 0.996 -> 1 (cosine)."""
    base_momentum: float = 0.996
    final_momentum: float = 1.0
    projector_layers: int = 2
    predictor_hidden_dim: int = 4096

    def __post_init__(self) -> None:
        _check("byol", self, unit=("base_momentum", "final_momentum"),
               at_least_one=("projector_layers", "predictor_hidden_dim"))


@method_section("simsiam")
@dataclass
class SimSiamConfig:
    """Chen & He 2021: 3-layer projector 2048 with BN on every layer, predictor 2048-512-2048."""
    projector_layers: int = 3
    predictor_hidden_dim: int = 512

    def __post_init__(self) -> None:
        _check("simsiam", self, at_least_one=("projector_layers", "predictor_hidden_dim"))


@method_section("barlow_twins")
@dataclass
class BarlowTwinsConfig:
    """Zbontar et al. 2021: 3-layer projector 8192 wide, off-diagonal weight lambda 5e-3."""
    lambd: float = 5e-3
    projector_layers: int = 3

    def __post_init__(self) -> None:
        _check("barlow_twins", self, non_negative=("lambd",), at_least_one=("projector_layers",))


@method_section("dino")
@dataclass
class DINOConfig:
    """Caron et al. 2021: 3-layer head (2048, GELU, no BN) to a 256 bottleneck (``model.feat_dim``),
    weight-normalised layer to K = 65536; teacher T 0.04, student 0.1, centre momentum 0.9, teacher
    EMA 0.996 -> 1 (cosine); the last layer is frozen during the first epoch, gradients clipped at 3."""
    out_dim: int = 65536
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 0  # linear warm-up from warmup_teacher_temp (ViT recipes: 30 epochs)
    center_momentum: float = 0.9
    base_momentum: float = 0.996
    final_momentum: float = 1.0
    projector_layers: int = 3
    batch_norm: bool = False
    norm_last_layer: bool = True
    freeze_last_layer_epochs: int = 1
    clip_grad: float = 3.0  # per-parameter gradient norm clip, applied in before_update (0 = off)

    def __post_init__(self) -> None:
        _check("dino", self, positive=("student_temp", "teacher_temp", "warmup_teacher_temp"),
               unit=("center_momentum", "base_momentum", "final_momentum"),
               at_least_one=("out_dim", "projector_layers"),
               non_negative=("warmup_teacher_temp_epochs", "freeze_last_layer_epochs", "clip_grad"))


#: ``methods.<name>``: one section per method of the family, in the order the sections are declared
MethodsConfig = make_dataclass(
    "MethodsConfig", [(name, cls, field(default_factory=cls)) for name, cls in _SECTIONS.items()],
    namespace={"__doc__": "``methods.<name>``: one section per method of the family (see :func:`method_section`)."})
MethodsConfig.__module__ = __name__  # pickles and prints as swav_fast.methods.configs.MethodsConfig

METHOD_SECTIONS = tuple(f.name for f in fields(MethodsConfig))


def method_config(cfg: Any, section: str) -> Any:
    """``cfg.methods.<section>`` (the paper defaults when ``cfg`` has no ``methods`` yet)."""
    if section not in METHOD_SECTIONS:
        raise ConfigError(f"unknown methods section {section!r}; valid: {', '.join(METHOD_SECTIONS)}")
    methods = getattr(cfg, "methods", None)
    if methods is None:
        methods = MethodsConfig()
    return getattr(methods, section)


def num_global_views(cfg: Any) -> int:
    """Global crops come first: ``data.crops.num_crops[0]`` of them."""
    return int(cfg.data.crops.num_crops[0])


def estimated_num_samples(cfg: Any) -> int:
    """Training-set size when the config alone tells it (the built-in synthetic set), else 0."""
    return int(cfg.data.synthetic.train_images) if cfg.data.path is None else 0


def estimated_total_steps(cfg: Any, world_size: int = 1) -> int:
    """``epochs * (samples // global batch)`` when the size is known from the config, else 0.

    The trainer knows the real figure (``len(loader) * epochs``) and passes it to
    ``method.on_train_start``; this estimate only makes a method usable on its own.
    """
    per_epoch = estimated_num_samples(cfg) // max(1, cfg.optim.batch_size * world_size)
    return int(cfg.optim.epochs) * per_epoch
