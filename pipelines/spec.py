"""`MultiCropSpec`: the one description of SwAV multi-crop augmentation that every backend consumes."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Mapping

from pipelines.errors import ConfigError

DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class MultiCropSpec:
    """Multi-crop augmentation, defaults as in the SwAV paper / official code (2x224 + 6x96).

    Crop group ``g`` yields ``num_crops[g]`` views of ``size_crops[g]`` pixels, cropped with
    RandomResizedCrop(scale=(min_scale_crops[g], max_scale_crops[g]), ratio=ratio).  Every view then
    gets flip, colour jitter ``ColorJitter(0.8s, 0.8s, 0.8s, 0.2s)`` (s = ``jitter_strength``) with
    probability ``jitter_p``, grayscale, Gaussian blur (sigma uniform in ``blur_sigma``), optional
    solarize (threshold 0.5) and normalisation.  Lists (not tuples) keep it YAML-friendly.
    """

    num_crops: list[int] = field(default_factory=lambda: [2, 6])
    size_crops: list[int] = field(default_factory=lambda: [224, 96])
    min_scale_crops: list[float] = field(default_factory=lambda: [0.14, 0.05])
    max_scale_crops: list[float] = field(default_factory=lambda: [1.0, 0.14])
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    flip_p: float = 0.5
    jitter_strength: float = 1.0
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])
    solarize_p: float = 0.0
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.228, 0.224, 0.225])
    dtype: str = "float32"
    channels_last: bool = False

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        for name in ("num_crops", "size_crops"):
            set_(self, name, _int_list(name, getattr(self, name)))
        for name in ("min_scale_crops", "max_scale_crops", "ratio", "blur_sigma", "mean", "std"):
            set_(self, name, _float_list(name, getattr(self, name)))
        for name in ("flip_p", "jitter_strength", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            set_(self, name, _float(name, getattr(self, name)))
        self._validate()

    def _validate(self) -> None:
        n = len(self.num_crops)
        if n == 0:
            raise ConfigError("num_crops: needs at least one crop group")
        for name in ("size_crops", "min_scale_crops", "max_scale_crops"):
            if len(getattr(self, name)) != n:
                raise ConfigError(
                    f"{name}: has {len(getattr(self, name))} entries but num_crops has {n}; "
                    "every crop group needs one value in each list")
        for g in range(n):
            if self.num_crops[g] < 1:
                raise ConfigError(f"num_crops[{g}]: must be >= 1, got {self.num_crops[g]}")
            if self.size_crops[g] < 1:
                raise ConfigError(f"size_crops[{g}]: must be >= 1, got {self.size_crops[g]}")
            lo, hi = self.min_scale_crops[g], self.max_scale_crops[g]
            if not 0.0 < lo <= 1.0:
                raise ConfigError(f"min_scale_crops[{g}]: must be in (0, 1], got {lo}")
            if not 0.0 < hi <= 1.0:
                raise ConfigError(f"max_scale_crops[{g}]: must be in (0, 1], got {hi}")
            if lo > hi:
                raise ConfigError(f"min_scale_crops[{g}]: {lo} is larger than max_scale_crops[{g}] = {hi}")
        _pair("ratio", self.ratio, lo_exclusive=0.0)
        _pair("blur_sigma", self.blur_sigma, lo_exclusive=0.0)
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ConfigError(f"{name}: probability must be in [0, 1], got {p}")
        if not 0.0 <= self.jitter_strength <= 2.5:
            raise ConfigError(
                f"jitter_strength: must be in [0, 2.5] (hue = 0.2*s must stay <= 0.5), got {self.jitter_strength}")
        for name in ("mean", "std"):
            if len(getattr(self, name)) != 3:
                raise ConfigError(f"{name}: needs 3 values (RGB), got {getattr(self, name)}")
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"std: values must be > 0, got {self.std}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype: must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.channels_last, bool):
            raise ConfigError(f"channels_last: must be true or false, got {self.channels_last!r}")

    # -- derived values ------------------------------------------------------------------------
    @property
    def num_views(self) -> int:
        """Total views per image (sum of num_crops)."""
        return sum(self.num_crops)

    @property
    def view_sizes(self) -> list[int]:
        """Output size of every view, in view order (global crops first)."""
        return [s for s, c in zip(self.size_crops, self.num_crops) for _ in range(c)]

    @property
    def view_groups(self) -> list[int]:
        """Crop-group index of every view."""
        return [g for g, c in enumerate(self.num_crops) for _ in range(c)]

    @property
    def resolution_groups(self) -> list[tuple[int, int]]:
        """``(size, count)`` per crop group, in view order."""
        return list(zip(self.size_crops, self.num_crops))

    @property
    def jitter_factors(self) -> tuple[float, float, float, float]:
        """ColorJitter (brightness, contrast, saturation, hue) magnitudes, as in SwAV's code."""
        s = self.jitter_strength
        return 0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s

    @property
    def torch_dtype(self) -> Any:
        import torch

        return getattr(torch, self.dtype)

    def scale_range(self, view_index: int) -> tuple[float, float]:
        """RandomResizedCrop scale range of view ``view_index``."""
        g = self.view_groups[view_index]
        return self.min_scale_crops[g], self.max_scale_crops[g]

    # -- YAML ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain dict (lists, floats, ints, str, bool) for YAML/JSON."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "MultiCropSpec":
        """Build from a (YAML) mapping; unknown keys raise ConfigError."""
        data = dict(data or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown multi-crop key(s): {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        return cls(**data)

    def replace(self, **changes: Any) -> "MultiCropSpec":
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)


#: The loader dtype that matches a training step's autocast precision (``auto``: bf16 on CUDA).
STEP_DTYPES = {"auto": "bfloat16", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def spec_for_step(spec: MultiCropSpec, step_device: Any, precision: str,
                  channels_last: bool) -> MultiCropSpec:
    """The spec a loader should use to write what a training step on ``step_device`` reads.

    On CUDA a bf16 (or fp16) step with channels-last inputs gets its views in that dtype and layout
    straight from the loader (no per-step conversion copy, half the bytes). The spec's defaults
    (``float32``, ``channels_last: false``) count as "not set" and follow the step; a dtype or layout
    set explicitly (``data.crops.dtype: float16``, ``channels_last: true``) is kept. Float32 views for a
    bf16 step would gain nothing: autocast casts them to bf16 at the first convolution anyway. Off
    CUDA the spec is returned unchanged.
    """
    import torch

    if torch.device(step_device).type != "cuda":
        return spec
    if precision not in STEP_DTYPES:
        raise ConfigError(f"precision: must be one of {', '.join(STEP_DTYPES)}, got {precision!r}")
    changes: dict[str, Any] = {}
    if spec.dtype == "float32" and STEP_DTYPES[precision] != "float32":
        changes["dtype"] = STEP_DTYPES[precision]
    if channels_last and not spec.channels_last:
        changes["channels_last"] = True
    return spec.replace(**changes) if changes else spec


def _int_list(name: str, value: Any) -> list[int]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ConfigError(f"{name}: expected a list of integers, got {value!r}")
    out = []
    for v in value:
        integral = isinstance(v, numbers.Integral) or (isinstance(v, float) and v.is_integer())
        if isinstance(v, bool) or not integral:
            raise ConfigError(f"{name}: expected integers, got {v!r}")
        out.append(int(v))
    return out


def _float_list(name: str, value: Any) -> list[float]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ConfigError(f"{name}: expected a list of numbers, got {value!r}")
    return [_float(name, v) for v in value]


def _float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name}: expected a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ConfigError(f"{name}: must be finite, got {value!r}")
    return v


def _pair(name: str, value: list[float], lo_exclusive: float) -> None:
    if len(value) != 2:
        raise ConfigError(f"{name}: needs exactly 2 values [min, max], got {value}")
    if value[0] <= lo_exclusive:
        raise ConfigError(f"{name}: values must be > {lo_exclusive}, got {value}")
    if value[0] > value[1]:
        raise ConfigError(f"{name}: min {value[0]} is larger than max {value[1]}")
