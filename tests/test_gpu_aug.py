"""pipelines.gpu_aug: the batched colour matrix, blur, solarize and normalisation vs float64 formulas,
torchvision / PIL per-image ops (documented tolerances), parameter statistics, dtypes and layouts."""

from __future__ import annotations

import math
from dataclasses import fields

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import ImageFilter

from pipelines.gpu_aug import (
    LUMA,
    ColourParams,
    augment_views,
    blur_radius,
    colour_matrices,
    colour_params_from_batch,
    compiled_kernels,
    constant,
    sample_colour_params,
)
from pipelines.params import sample_params_for_indices
from pipelines.spec import MultiCropSpec
from pipelines.errors import ConfigError

RAW = MultiCropSpec(mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])  # output = colour-augmented [0, 1] values
W = np.array(LUMA)


def smooth_crops(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Photo-like uint8 crops: upsampled random colours plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=size, mode="bilinear")
    x = x + 0.03 * torch.randn(x.shape, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def neutral(n: int, **changes: torch.Tensor) -> ColourParams:
    base = dict(jitter=torch.zeros(n, dtype=torch.bool), brightness=torch.ones(n), contrast=torch.ones(n),
                saturation=torch.ones(n), hue=torch.zeros(n), order=torch.arange(4).repeat(n, 1),
                grayscale=torch.zeros(n, dtype=torch.bool), blur_sigma=torch.zeros(n),
                solarize=torch.zeros(n, dtype=torch.bool))
    base.update(changes)
    return ColourParams(**base)


# -- float64 reference, written op by op from the formulas ------------------------------------------
def ref_hue(x: np.ndarray, h: float) -> np.ndarray:
    """Rodrigues rotation of every RGB vector about the unit gray axis k by 2 pi h."""
    a = 2 * math.pi * h
    k = np.ones(3) / math.sqrt(3)
    v = x.reshape(3, -1)
    kxv = np.cross(k[:, None], v, axis=0)
    out = v * math.cos(a) + kxv * math.sin(a) + k[:, None] * (k @ v)[None] * (1 - math.cos(a))
    return out.reshape(x.shape)


def ref_blur(y: np.ndarray, sigma: float, radius: int) -> np.ndarray:
    k = np.arange(-radius, radius + 1)
    g = np.exp(-k ** 2 / (2 * sigma ** 2))
    g /= g.sum()
    for axis in (2, 1):
        n = y.shape[axis]
        acc = np.zeros_like(y)
        for j, wj in zip(k, g):
            idx = np.clip(np.arange(n) + j, 0, n - 1)
            acc += wj * np.take(y, idx, axis=axis)
        y = acc
    return y


def ref_view(x8: np.ndarray, p: ColourParams, i: int, spec: MultiCropSpec) -> np.ndarray:
    """torchvision's semantics (real mean of the current image, clamp after every op), gray-axis hue."""
    x = x8.astype(np.float64) / 255.0
    f = {0: float(p.brightness[i]), 1: float(p.contrast[i]), 2: float(p.saturation[i]), 3: float(p.hue[i])}
    for op in p.order[i].tolist():
        if op == 0:
            x = f[0] * x
        elif op == 1:
            x = f[1] * x + (1 - f[1]) * np.einsum("c,chw->", W, x) / (x.shape[1] * x.shape[2])
        elif op == 2:
            x = f[2] * x + (1 - f[2]) * np.einsum("c,chw->hw", W, x)[None]
        else:
            x = ref_hue(x, f[3])
        x = np.clip(x, 0, 1)
    if bool(p.grayscale[i]):
        x = np.repeat(np.einsum("c,chw->hw", W, x)[None], 3, axis=0)
    if float(p.blur_sigma[i]) > 0:
        x = ref_blur(x, float(p.blur_sigma[i]), blur_radius(spec))
    if bool(p.solarize[i]):
        x = np.where(x >= 0.5, 1 - x, x)
    return (x - np.array(spec.mean)[:, None, None]) / np.array(spec.std)[:, None, None]


def mid_range(n: int, size: int = 12) -> torch.Tensor:
    """Crops in [0.35, 0.65]: with factors in [0.8, 1.2] and |hue| <= 0.05 no op leaves [0, 1]."""
    return (90 + smooth_crops(n, size).float() * (76 / 255)).round().to(torch.uint8)


def test_matches_float64_reference() -> None:
    """Where no intermediate value is clamped, the propagated contrast mean is the real one: the kernel
    equals the op-by-op float64 formulas (any order, grayscale, per-sample blur, solarize, normalise)."""
    spec = MultiCropSpec(jitter_strength=0.25, jitter_p=0.9, grayscale_p=0.3, blur_p=0.5, solarize_p=0.3)
    n = 48
    p = sample_colour_params(spec, n, seed=1)
    assert p.jitter.any() and p.grayscale.any() and (p.blur_sigma > 0).any() and p.solarize.any()
    x = mid_range(n)
    out = augment_views(x, p, spec)
    assert out.shape == x.shape and out.dtype == torch.float32
    ref = np.stack([ref_view(x[i].numpy(), p, i, spec) for i in range(n)])
    assert np.abs(out.numpy() - ref).max() < 2e-5 / min(spec.std) + 1e-5
    # and the composed single matrix is the same map there
    m, t = colour_matrices(p, x.float().mean(dim=(2, 3)) / 255)
    one = torch.einsum("bij,bjhw->bihw", m, x.float() / 255) + t[:, :, None, None]
    no_blur = ColourParams(**{**vars(p), "blur_sigma": torch.zeros(n),
                              "solarize": torch.zeros(n, dtype=torch.bool)})
    plain = augment_views(x, no_blur, RAW)
    assert (one - plain).abs().max() < 1e-5


def test_clamps_after_every_op_like_torchvision() -> None:
    """Bright, saturated crops: brightness 1.8 clips, then saturation and grayscale see the clipped values."""
    n = 8
    x = smooth_crops(n)
    p = neutral(n, jitter=torch.ones(n, dtype=torch.bool), brightness=torch.full((n,), 1.8),
                saturation=torch.full((n,), 1.6), grayscale=torch.ones(n, dtype=torch.bool))
    ours = augment_views(x, p, RAW)
    ref = torch.stack([
        TF.rgb_to_grayscale(TF.adjust_saturation(TF.adjust_brightness(x[i].float() / 255, 1.8), 1.6), 3)
        for i in range(n)])
    assert (ours - ref).abs().max() < 3e-4
    m, t = colour_matrices(p, x.float().mean(dim=(2, 3)) / 255)
    unclamped = (torch.einsum("bij,bjhw->bihw", m, x.float() / 255) + t[:, :, None, None]).clamp(0, 1)
    assert (unclamped - ref).abs().mean() > 0.05  # one matrix would be far off here


@pytest.mark.parametrize("op", ["brightness", "contrast", "saturation"])
def test_single_op_equals_torchvision(op: str) -> None:
    """One op then a clamp: the matrix form is torchvision's float op (whose red luma weight is 0.2989,
    ours and PIL's 0.299: differences <= 1e-4)."""
    n = 16
    x = smooth_crops(n)
    lo_hi = torch.linspace(0.2, 1.8, n)
    p = neutral(n, jitter=torch.ones(n, dtype=torch.bool), **{op: lo_hi})
    ours = augment_views(x, p, RAW)
    fn = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast,
          "saturation": TF.adjust_saturation}[op]
    ref = torch.stack([fn(x[i].float() / 255, float(lo_hi[i])) for i in range(n)])
    assert (ours - ref).abs().max() < (2e-6 if op == "brightness" else 1e-4)


def test_grayscale_equals_torchvision() -> None:
    x = smooth_crops(8)
    ours = augment_views(x, neutral(8, grayscale=torch.ones(8, dtype=torch.bool)), RAW)
    ref = torch.stack([TF.rgb_to_grayscale(x[i].float() / 255, num_output_channels=3) for i in range(8)])
    assert (ours - ref).abs().max() < 2e-4
    assert torch.equal(ours[:, 0], ours[:, 1]) and torch.equal(ours[:, 1], ours[:, 2])


def test_hue_rotation_tolerance_vs_hsv_shift() -> None:
    """Documented: gray-axis rotation vs torchvision's HSV shift -- exact at 1/3 turn and on gray pixels,
    mean absolute difference about 0.05, at most 0.08 (of 1) per crop for |h| <= 0.2 on saturated colours."""
    n = 32
    x = smooth_crops(n)
    hues = torch.linspace(-0.2, 0.2, n)
    ours = augment_views(x, neutral(n, jitter=torch.ones(n, dtype=torch.bool), hue=hues), RAW)
    ref = torch.stack([TF.adjust_hue(x[i].float() / 255, float(hues[i])) for i in range(n)])
    err = (ours - ref).abs().mean(dim=(1, 2, 3))
    assert err.max() < 0.08 and err[n // 2 - 1:n // 2 + 1].max() < 0.01  # |h| ~ 0.006 near the middle
    third = augment_views(x, neutral(n, hue=torch.full((n,), 1 / 3)), RAW)
    assert (third - x.float().div(255)[:, [2, 0, 1]]).abs().max() < 1e-5  # R <- B, G <- R, B <- G
    gray = x[:, :1].expand(n, 3, 16, 16).contiguous()
    assert (augment_views(gray, neutral(n, hue=hues), RAW) - gray.float() / 255).abs().max() < 1e-5


def test_random_chain_tolerance_vs_torchvision() -> None:
    """Documented: full random jitter chains vs torchvision (clamp after every op, HSV hue): median
    per-crop mean absolute difference < 0.04, 90th percentile < 0.1 (of 1); without hue the median is
    ~0 (only crops whose values left [0, 1] mid-chain differ)."""
    spec = RAW.replace(jitter_p=1.0, grayscale_p=0.0, blur_p=0.0)
    n = 200
    p = sample_colour_params(spec, n, seed=3)
    x = smooth_crops(n)
    fns = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)

    def torchvision_chain(params: ColourParams) -> torch.Tensor:
        outs = []
        for i in range(n):
            y = x[i].float() / 255
            f = (params.brightness[i], params.contrast[i], params.saturation[i], params.hue[i])
            for k in params.order[i].tolist():
                y = fns[k](y, float(f[k]))
            outs.append(y)
        return torch.stack(outs)

    err = (augment_views(x, p, spec) - torchvision_chain(p)).abs().mean(dim=(1, 2, 3)).numpy()
    assert np.median(err) < 0.04 and np.percentile(err, 90) < 0.1
    no_hue = ColourParams(**{**vars(p), "hue": torch.zeros(n)})
    err = (augment_views(x, no_hue, spec) - torchvision_chain(no_hue)).abs().mean(dim=(1, 2, 3)).numpy()
    assert np.median(err) < 2e-3 and np.percentile(err, 90) < 0.05


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
def test_blur_close_to_pil_gaussian_blur(sigma: float) -> None:
    x = smooth_crops(4, 32, seed=5)
    ours = augment_views(x, neutral(4, blur_sigma=torch.full((4,), sigma)), RAW)
    ref = torch.stack([TF.pil_to_tensor(TF.to_pil_image(x[i]).filter(ImageFilter.GaussianBlur(radius=sigma)))
                       for i in range(4)]).float() / 255
    assert (ours - ref).abs().mean() < 1.5 / 255 and (ours - ref).abs().max() < 8 / 255
    assert (ours - x.float() / 255).abs().mean() > 2 * (ours - ref).abs().mean()  # it did blur


def test_blur_only_on_samples_that_drew_it() -> None:
    spec = MultiCropSpec(blur_p=0.5)
    n = 64
    p = sample_colour_params(spec, n, seed=2)
    drew = p.blur_sigma > 0
    assert 0 < drew.sum() < n
    x = smooth_crops(n)
    out = augment_views(x, p, spec)
    unblurred = augment_views(x, ColourParams(**{**vars(p), "blur_sigma": torch.zeros(n)}), spec)
    same = (out == unblurred).flatten(1).all(dim=1)
    assert same[~drew].all()
    assert not same[p.blur_sigma > 0.4].any()  # sigma ~0.1 moves a pixel by ~e^-50 of its neighbours


def test_solarize_inverts_bright_values() -> None:
    x = torch.arange(0, 256, dtype=torch.uint8).view(1, 1, 16, 16).expand(2, 3, 16, 16).contiguous()
    p = neutral(2, solarize=torch.tensor([True, False]))
    out = augment_views(x, p, RAW)
    v = x[0].float() / 255
    assert torch.allclose(out[0], torch.where(v >= 0.5, 1 - v, v), atol=1e-6)
    assert torch.allclose(out[1], v, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_dtype_layout_and_range(dtype: str, channels_last: bool) -> None:
    spec = MultiCropSpec(dtype=dtype, channels_last=channels_last, solarize_p=0.2)
    n = 24
    p = sample_colour_params(spec, n, seed=4)
    out = augment_views(smooth_crops(n, 10), p, spec)
    assert out.shape == (n, 3, 10, 10) and out.dtype == getattr(torch, dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)
    mean, std = torch.tensor(spec.mean).view(3, 1, 1), torch.tensor(spec.std).view(3, 1, 1)
    raw = out.float() * std + mean
    tol = 1e-5 if dtype == "float32" else 2e-2
    assert raw.min() >= -tol and raw.max() <= 1 + tol
    ref = augment_views(smooth_crops(n, 10), p, spec.replace(dtype="float32", channels_last=False))
    assert (out.float() - ref).abs().max() < (1e-6 if dtype == "float32" else 3e-2)


def test_float_input_equals_uint8_input() -> None:
    p = sample_colour_params(MultiCropSpec(), 8, seed=0)
    x = smooth_crops(8)
    assert torch.allclose(augment_views(x, p, MultiCropSpec()), augment_views(x.float(), p, MultiCropSpec()),
                          atol=1e-6)


def test_errors_name_the_problem() -> None:
    p = sample_colour_params(MultiCropSpec(), 4)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        augment_views(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), p, MultiCropSpec())
    with pytest.raises(ValueError, match="4 colour parameter rows for 5 crops"):
        augment_views(torch.zeros(5, 3, 8, 8, dtype=torch.uint8), p, MultiCropSpec())
    none = p.select(torch.zeros(4, dtype=torch.bool))
    empty = torch.zeros(0, 3, 8, 8, dtype=torch.uint8)
    assert augment_views(empty, none, MultiCropSpec()).shape == (0, 3, 8, 8)


# -- parameters -------------------------------------------------------------------------------------
def test_sample_colour_params_is_the_shared_draw() -> None:
    """The colour parameters are those of the one generator (pipelines.params; its statistics are tested
    in tests/test_randomness.py): view ``v`` of samples ``indices`` in ``epoch``."""
    spec = MultiCropSpec(solarize_p=0.1)
    idx = np.array([3, 17, 4, 250, 9])
    p = sample_colour_params(spec, idx, seed=5, epoch=2, view=3)
    ref = colour_params_from_batch(sample_params_for_indices(spec, 5, 2, idx, [64] * 5, [48] * 5)[3], "cpu")
    assert len(p) == 5 and p.order.shape == (5, 4) and p.order.dtype == torch.int64
    for f in fields(ColourParams):
        assert torch.equal(getattr(p, f.name), getattr(ref, f.name)), f.name
    first = sample_colour_params(spec, 5, seed=5, epoch=2, view=3)  # an int n: samples 0..n-1
    assert torch.equal(first.hue, sample_colour_params(spec, np.arange(5), seed=5, epoch=2, view=3).hue)
    assert not torch.equal(first.hue, sample_colour_params(spec, 5, seed=5, epoch=2, view=2).hue)
    with pytest.raises(ConfigError, match="view"):
        sample_colour_params(spec, 5, view=spec.num_views)


def test_colour_params_from_batch_round_trip() -> None:
    spec = MultiCropSpec(solarize_p=0.3)
    b = sample_params_for_indices(spec, 0, 0, np.arange(50), [64] * 50, [48] * 50)[2]
    p = colour_params_from_batch(b, "cpu")
    assert len(p) == 50 and p.order.dtype == torch.int64 and p.jitter.dtype == torch.bool
    for i in range(50):
        r = b.row(i)
        assert bool(p.jitter[i]) == r.jitter and bool(p.grayscale[i]) == r.grayscale
        assert bool(p.solarize[i]) == r.solarize and tuple(p.order[i].tolist()) == r.jitter_order
        for name in ("brightness", "contrast", "saturation", "hue", "blur_sigma"):
            assert float(getattr(p, name)[i]) == pytest.approx(getattr(r, name), abs=1e-6)
    both = ColourParams.cat([p, p.select(torch.arange(3))])
    assert len(both) == 53 and torch.equal(both.order[50:], p.order[:3])


def test_constants_are_built_once_per_device_and_dtype(monkeypatch) -> None:
    """No small tensor is built from a Python list per batch (on CUDA each is a blocking copy): after a
    first call, augmenting and sampling build none, and the results are those of the first call."""
    a = constant((0.5, 0.25), torch.float32, "cpu")
    assert constant([0.5, 0.25], torch.float32, torch.device("cpu")) is a
    assert constant((0.5, 0.25), torch.float64, "cpu") is not a and a.tolist() == [0.5, 0.25]
    assert constant(np.array([[1, 2]]), torch.int64, "cpu").tolist() == [[1, 2]]
    spec = MultiCropSpec(jitter_strength=0.25, jitter_p=0.9, grayscale_p=0.3, blur_p=0.5, solarize_p=0.3)
    p = sample_colour_params(spec, 24, seed=3)
    x = mid_range(24)
    first = augment_views(x, p, spec)
    built: list[object] = []
    real_tensor = torch.tensor

    def counting(data, *args, **kwargs):
        built.append(data)
        return real_tensor(data, *args, **kwargs)

    monkeypatch.setattr(torch, "tensor", counting)
    again = augment_views(x, p, spec)
    q = sample_colour_params(spec, 24, seed=3)
    assert built == []
    assert torch.equal(again, first) and torch.equal(q.order, p.order) and torch.equal(q.hue, p.hue)
    ref = np.stack([ref_view(x[i].numpy(), p, i, spec) for i in range(24)])  # the formula's values
    assert np.abs(first.numpy() - ref).max() < 1e-4


# -- CUDA -------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_cuda_compiled_matches_cpu_eager() -> None:
    from pipelines import gpu_aug

    spec = MultiCropSpec(solarize_p=0.2, blur_p=0.5)
    for n, size in ((40, 24), (33, 24), (17, 16)):  # varying batch and size: dynamic shapes
        p = sample_colour_params(spec, n, seed=n)
        x = smooth_crops(n, size)
        cpu = augment_views(x, p, spec)
        gpu = augment_views(x.cuda(), p, spec)  # host params, CUDA crops
        assert gpu.device.type == "cuda" and (gpu.cpu() - cpu).abs().max() < 1e-4
        gpu2 = augment_views(x.cuda(), p.to("cuda"), spec)  # device params (nonzero sync path)
        assert (gpu2.cpu() - cpu).abs().max() < 1e-4
    assert not gpu_aug._PLAIN.failed and not gpu_aug._BLURRED.failed


@pytest.mark.gpu
def test_cuda_bf16_channels_last_and_params_on_device() -> None:
    spec = MultiCropSpec(dtype="bfloat16", channels_last=True)
    p = sample_colour_params(spec, 256, seed=0, device="cuda")
    assert p.device.type == "cuda"
    out = augment_views(smooth_crops(256, 32).cuda(), p, spec)
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    f32 = spec.replace(dtype="float32", channels_last=False)
    ref = augment_views(smooth_crops(256, 32), p.to("cpu"), f32)
    assert (out.float().cpu() - ref).abs().max() < 3e-2


@pytest.mark.gpu
def test_compiled_kernels_equal_eager_on_cuda() -> None:
    from pipelines import gpu_aug

    spec = MultiCropSpec(blur_p=0.5, solarize_p=0.3)
    p = sample_colour_params(spec, 64, seed=9)
    x = smooth_crops(64, 20).cuda()
    eager = augment_views(x, p, spec, kernels=(gpu_aug._plain_path, gpu_aug._blur_path))
    compiled = augment_views(x, p, spec, kernels=compiled_kernels())
    assert (eager - compiled).abs().max() < 1e-5
