"""MultiCropSpec: paper defaults, derived values, validation naming the bad field."""

from __future__ import annotations

import pytest

from pipelines import MultiCropSpec
from swav_fast.errors import ConfigError


def test_defaults_match_swav_paper() -> None:
    s = MultiCropSpec()
    assert s.num_crops == [2, 6]
    assert s.size_crops == [224, 96]
    assert s.min_scale_crops == [0.14, 0.05]
    assert s.max_scale_crops == [1.0, 0.14]
    assert s.ratio == pytest.approx([3 / 4, 4 / 3])
    assert (s.flip_p, s.jitter_strength, s.jitter_p, s.grayscale_p, s.blur_p, s.solarize_p) == (
        0.5, 1.0, 0.8, 0.2, 0.5, 0.0)
    assert s.jitter_factors == pytest.approx((0.8, 0.8, 0.8, 0.2))
    assert s.blur_sigma == [0.1, 2.0]
    assert s.mean == [0.485, 0.456, 0.406]
    assert s.std == [0.228, 0.224, 0.225]
    assert s.dtype == "float32" and s.channels_last is False


def test_derived_views_and_groups() -> None:
    s = MultiCropSpec()
    assert s.num_views == 8
    assert s.view_sizes == [224, 224] + [96] * 6
    assert s.view_groups == [0, 0] + [1] * 6
    assert s.resolution_groups == [(224, 2), (96, 6)]
    assert s.scale_range(1) == (0.14, 1.0) and s.scale_range(2) == (0.05, 0.14)
    small = MultiCropSpec(num_crops=[2, 3], size_crops=[32, 16])
    assert small.view_sizes == [32, 32, 16, 16, 16] and small.num_views == 5


def test_yaml_friendly_round_trip() -> None:
    s = MultiCropSpec(num_crops=(2, 2), size_crops=(32, 16), ratio=(0.75, 1.25), dtype="bfloat16")
    assert isinstance(s.num_crops, list) and isinstance(s.ratio, list)
    d = s.to_dict()
    assert all(not isinstance(v, tuple) for v in d.values())
    assert MultiCropSpec.from_dict(d) == s
    assert MultiCropSpec.from_dict(None) == MultiCropSpec()
    with pytest.raises(ConfigError, match="size_crop"):
        MultiCropSpec.from_dict({"size_crop": [1]})


def test_frozen() -> None:
    with pytest.raises(AttributeError):
        MultiCropSpec().flip_p = 0.1  # type: ignore[misc]
    assert MultiCropSpec().replace(flip_p=0.0).flip_p == 0.0


@pytest.mark.parametrize("field,kwargs", [
    ("size_crops", {"size_crops": [224]}),
    ("min_scale_crops", {"min_scale_crops": [0.14]}),
    ("max_scale_crops", {"max_scale_crops": [1.0, 0.5, 0.2]}),
    ("num_crops", {"num_crops": [2, 0]}),
    ("num_crops", {"num_crops": [], "size_crops": [], "min_scale_crops": [], "max_scale_crops": []}),
    ("num_crops", {"num_crops": [2, 1.5]}),
    ("size_crops", {"size_crops": [224, 0]}),
    ("min_scale_crops", {"min_scale_crops": [0.0, 0.05]}),
    ("max_scale_crops", {"max_scale_crops": [1.2, 0.14]}),
    ("min_scale_crops", {"min_scale_crops": [0.14, 0.5]}),
    ("ratio", {"ratio": [4 / 3, 3 / 4]}),
    ("ratio", {"ratio": [0.0, 1.0]}),
    ("ratio", {"ratio": [1.0]}),
    ("flip_p", {"flip_p": 1.5}),
    ("jitter_p", {"jitter_p": -0.1}),
    ("grayscale_p", {"grayscale_p": 2}),
    ("blur_p", {"blur_p": float("nan")}),
    ("solarize_p", {"solarize_p": 1.01}),
    ("jitter_strength", {"jitter_strength": 3.0}),
    ("jitter_strength", {"jitter_strength": "strong"}),
    ("blur_sigma", {"blur_sigma": [2.0, 0.1]}),
    ("blur_sigma", {"blur_sigma": [0.0, 2.0]}),
    ("mean", {"mean": [0.5, 0.5]}),
    ("std", {"std": [0.2, 0.0, 0.2]}),
    ("dtype", {"dtype": "float64"}),
    ("channels_last", {"channels_last": "yes"}),
    ("min_scale_crops", {"min_scale_crops": "0.14"}),
])
def test_validation_names_field(field: str, kwargs: dict) -> None:
    with pytest.raises(ConfigError, match=field):
        MultiCropSpec(**kwargs)


def test_valid_variants() -> None:
    MultiCropSpec(num_crops=[2], size_crops=[224], min_scale_crops=[0.08], max_scale_crops=[1.0])
    MultiCropSpec(dtype="float16", channels_last=True, solarize_p=0.2, jitter_strength=0.5)
    MultiCropSpec(min_scale_crops=[1.0, 0.05], max_scale_crops=[1.0, 0.05])
