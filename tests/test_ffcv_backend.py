"""FFCV backend (needs the ``ffcv`` extra): shapes, order/sharding/resume, crop statistics, colour ops."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

import pipelines.ffcv_backend  # noqa: F401 - registers backend "ffcv"
from pipelines import MultiCropSpec, build_loader, scan_image_folder
from pipelines.ffcv_backend import (
    BetonIndex,
    FFCVLoader,
    adjust_hue,
    augment_batch,
    gaussian_blur,
    open_beton_index,
)
from pipelines.params import NUM_UNIFORMS, params_from_uniforms, sample_params_for_indices
from pipelines.pil import augment_view
from swav_fast.errors import ConfigError, DataError
from swav_fast.prepare import prepare_dataset
from tests.helpers import write_image_folder

#: numba's dispatcher finalizer raises a harmless KeyError at garbage collection under FFCV's compiler.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
W, H = 64, 48
PLAIN = dict(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])


@pytest.fixture(scope="module")
def gradient_beton(tmp_path_factory) -> Path:
    """2 classes x 12 images whose red channel encodes x and green encodes y (crops can be measured)."""
    base = tmp_path_factory.mktemp("ffcv")
    y, x = np.mgrid[0:H, 0:W]
    img = np.stack([x * 255 / (W - 1), y * 255 / (H - 1), np.full_like(x, 128.0)], -1).astype(np.uint8)
    for c in range(2):
        (base / "src" / f"c{c}").mkdir(parents=True)
        for i in range(12):
            Image.fromarray(img).save(base / "src" / f"c{c}" / f"{i:02d}.png")
    prepare_dataset(base / "src", base / "out", "beton", quality=95, workers=1, progress=False)
    return base / "out" / "train"


@pytest.fixture(scope="module")
def photo_beton(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("ffcv_photo")
    write_image_folder(base / "src", classes=3, per_class=6, size=(W, H))
    prepare_dataset(base / "src", base / "out", "beton", workers=1, progress=False)
    return base / "out" / "train"


def test_batches_order_sharding_and_resume(photo_beton: Path) -> None:
    spec = MultiCropSpec(num_crops=[2, 3], size_crops=[32, 16], dtype="bfloat16", channels_last=True)
    index = open_beton_index(photo_beton)
    assert (
        isinstance(index, BetonIndex)
        and len(index) == 18
        and index.classes == ["class_0", "class_1", "class_2"]
    )
    loader = build_loader(index, spec, 4, backend="ffcv", seed=5, drop_last=False)
    assert isinstance(loader, FFCVLoader) and len(loader) == 5
    batches = list(loader)
    assert [len(b) for b in batches] == [4, 4, 4, 4, 2]
    for b in batches:
        assert [tuple(v.shape[1:]) for v in b.views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
        assert all(
            v.dtype == torch.bfloat16 and v.is_contiguous(memory_format=torch.channels_last) for v in b.views
        )
        assert torch.equal(b.labels, b.indices // 6)  # 6 images per class, stored in source order
        assert b.num_bad == 0
    assert sorted(torch.cat([b.indices for b in batches]).tolist()) == list(range(18))
    assert torch.cat([b.indices for b in batches]).tolist() == loader.epoch_indices(0).tolist()
    # exact resume: the tail of epoch 1 from batch 2 is the same samples in the same order
    loader.set_epoch(1)
    full = [b.indices.tolist() for b in loader]
    loader.set_epoch(1, start_batch=2)
    assert [b.indices.tolist() for b in loader] == full[2:]
    # two ranks: disjoint halves
    ranks = [build_loader(index, spec, 3, backend="ffcv", rank=r, world_size=2, seed=5) for r in range(2)]
    seen = [torch.cat([b.indices for b in ld]).tolist() for ld in ranks]
    assert not set(seen[0]) & set(seen[1]) and len(seen[0]) == len(seen[1]) == 9


def test_crops_and_flips_are_the_shared_draw(gradient_beton: Path) -> None:
    """FFCV crops each view to the box of the shared draw (pipelines.params, whose statistics
    tests/test_randomness.py checks): measured on a gradient image, every view's box (size and centre)
    is the drawn one to interpolation accuracy, and it is flipped exactly when drawn."""
    spec = MultiCropSpec(num_crops=[2, 2], size_crops=[32, 16], **PLAIN)
    loader = build_loader(open_beton_index(gradient_beton), spec, 8, backend="ffcv", seed=3)
    errs: list[float] = []
    flips = 0
    for epoch in range(2):
        loader.set_epoch(epoch)
        for b in loader:
            idx = b.indices.numpy()
            sizes = np.full(len(idx), W), np.full(len(idx), H)
            params = sample_params_for_indices(spec, 3, epoch, idx, *sizes)
            for v, view in enumerate(b.views):
                p = params[v]
                s = view.shape[-1]
                x, y = view[:, 0].double() * (W - 1), view[:, 1].double() * (H - 1)  # source pixel coords
                dx = x[:, :, -1].mean(1) - x[:, :, 0].mean(1)  # first to last output column centre
                dy = y[:, -1, :].mean(1) - y[:, 0, :].mean(1)
                assert torch.equal(dx < 0, torch.as_tensor(p.flip))  # flipped exactly when drawn
                flips += int(p.flip.sum())
                w, h = dx.abs() * s / (s - 1), dy * s / (s - 1)  # centres span (S-1)/S of the crop
                cx, cy = x.mean(dim=(1, 2)) + 0.5, y.mean(dim=(1, 2)) + 0.5  # pixel centres at +1/2
                for measured, drawn in ((w, p.width), (h, p.height), (cx, p.left + p.width / 2),
                                        (cy, p.top + p.height / 2)):
                    errs.extend((measured.numpy() - drawn).tolist())
    errs_a = np.abs(np.array(errs))
    assert len(errs) == 2 * 24 * 4 * 4 and 0 < flips < 2 * 24 * 4
    assert errs_a.max() < 1.5 and errs_a.mean() < 0.4, (errs_a.max(), errs_a.mean())  # source pixels


def test_grayscale_and_normalisation(gradient_beton: Path) -> None:
    mean, std = [0.485, 0.456, 0.406], [0.228, 0.224, 0.225]
    spec = MultiCropSpec(
        num_crops=[1, 1], size_crops=[24, 12], grayscale_p=1.0, jitter_p=0.0, blur_p=0.0, mean=mean, std=std
    )
    loader = build_loader(open_beton_index(gradient_beton), spec, 12, backend="ffcv")
    for b in loader:
        for v in b.views:
            rgb = v * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
            assert torch.allclose(rgb[:, 0], rgb[:, 1], atol=1e-5) and torch.allclose(
                rgb[:, 1], rgb[:, 2], atol=1e-5
            )
            assert rgb.min() >= -1e-5 and rgb.max() <= 1 + 1e-5


def _rand_batch(seed: int, b: int = 6, s: int = 20) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(b, 3, 1, 1, generator=g)
    return (base * 0.6 + 0.4 * torch.rand(b, 3, s, s, generator=g)).clamp(0, 1)


def test_colour_ops_match_torchvision() -> None:
    x = _rand_batch(0)
    f = torch.tensor([0.2, 0.6, 1.0, 1.3, 1.8, 0.9])
    hue = torch.tensor([-0.2, -0.05, 0.0, 0.1, 0.19, 0.5])
    from pipelines.ffcv_backend import _jitter_op

    for k, fn in enumerate((TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)):
        ours = _jitter_op(k, x.clone(), f)
        ref = torch.stack([fn(x[i], float(f[i])) for i in range(len(x))])
        assert torch.allclose(ours, ref, atol=1e-5), k
    ours = adjust_hue(x, hue)
    ref = torch.stack([TF.adjust_hue(x[i], float(hue[i])) for i in range(len(x))])
    assert torch.allclose(ours, ref, atol=1e-4)


def test_gaussian_blur_matches_formula() -> None:
    x = _rand_batch(1, b=4, s=24).double()
    sigma = torch.tensor([0.0, 0.1, 0.8, 2.0], dtype=torch.float64)
    ours = gaussian_blur(x, sigma)
    assert torch.equal(ours[0], x[0])  # sigma 0: unchanged
    radius = 6  # ceil(3 * 2.0)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    for i in (1, 2, 3):
        k = torch.exp(-(t**2) / (2 * sigma[i] ** 2))
        k = k / k.sum()
        pad = torch.nn.functional.pad(x[i:i + 1], (radius,) * 4, mode="reflect")[0]
        rows = torch.stack([(pad[:, :, j:j + 2 * radius + 1] * k).sum(-1) for j in range(24)], -1)
        ref = torch.stack([(rows[:, j:j + 2 * radius + 1, :] * k.view(-1, 1)).sum(1) for j in range(24)], 1)
        assert torch.allclose(ours[i], ref, atol=1e-10), i


def test_augment_batch_close_to_pil_reference() -> None:
    """Same parameters through the PIL reference (uint8 at each step) and the batched torch ops."""
    spec = MultiCropSpec(
        num_crops=[1],
        size_crops=[32],
        min_scale_crops=[1.0],
        max_scale_crops=[1.0],
        ratio=[1.0, 1.0],
        blur_p=0.0,
        solarize_p=0.5,
    )
    rng = np.random.default_rng(4)
    imgs = (_rand_batch(2, b=64, s=32) * 255).round().to(torch.uint8)
    u = rng.random((64, NUM_UNIFORMS))
    p = params_from_uniforms(spec, 0, np.full(64, 32), np.full(64, 32), u)
    assert p.jitter.sum() > 30 and p.grayscale.sum() > 3 and p.solarize.sum() > 15 and p.flip.sum() > 15
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    ours = augment_batch(imgs, p, mean, std) * std + mean
    ref = (
        torch.stack(
            [
                augment_view(Image.fromarray(imgs[i].permute(1, 2, 0).numpy()), p.row(i), mean[0], std[0])
                for i in range(64)
            ]
        )
        * std
        + mean
    )
    diff = (ours - ref).abs()
    assert diff.mean() < 0.01 and diff.flatten(1).mean(1).max() < 0.03, (diff.mean(), diff.max())


def test_wrong_sources_are_clear_errors(photo_beton: Path, tmp_path: Path) -> None:
    spec = MultiCropSpec(num_crops=[1], size_crops=[16], min_scale_crops=[0.14], max_scale_crops=[1.0])
    folder = write_image_folder(tmp_path / "imgs", classes=2, per_class=2)
    with pytest.raises(ConfigError, match="prepare --format beton"):
        build_loader(scan_image_folder(folder), spec, 2, backend="ffcv")
    prepare_dataset(folder, tmp_path / "wds", "wds", workers=1, progress=False)
    with pytest.raises(DataError, match="holds a wds dataset"):
        FFCVLoader(tmp_path / "wds" / "train", spec, 2)
    # the .beton path itself works, and the manifest gives the class names
    loader = FFCVLoader(photo_beton / "train.beton", spec, 6)
    assert loader.classes == ["class_0", "class_1", "class_2"] and len(loader) == 3
