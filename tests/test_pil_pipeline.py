"""The PIL reference dataset (the statistics of its parameters, the shared generator's, are tested in
tests/test_randomness.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from pipelines import MultiCropSpec, scan_image_folder
from pipelines import pil as pil_mod
from pipelines.params import sample_params
from pipelines.pil import PILMultiCropDataset, decode_rgb

SMALL = MultiCropSpec(num_crops=[2, 2], size_crops=[32, 16])
PLAIN = SMALL.replace(flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)


def write_jpeg(path: Path, w: int = 64, h: int = 48, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, w)[None, :, None] * rng.uniform(0.3, 1.0, 3)
    arr = np.clip(ramp + rng.integers(0, 60, (h, w, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, quality=90)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    for c in range(2):
        for k in range(3):
            write_jpeg(tmp_path / f"class{c}" / f"img{k}.jpg", seed=10 * c + k)
    return tmp_path


# -- PIL dataset -----------------------------------------------------------------------------------
def test_shapes_dtypes_ranges(folder: Path) -> None:
    ds = PILMultiCropDataset(scan_image_folder(folder), SMALL, seed=0)
    assert len(ds) == 6
    lo = min((0 - m) / s for m, s in zip(SMALL.mean, SMALL.std)) - 1e-4
    hi = max((1 - m) / s for m, s in zip(SMALL.mean, SMALL.std)) + 1e-4
    for i in range(len(ds)):
        views, label, index, ok = ds[i]
        assert ok and index == i and label == i // 3
        assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 2
        for v in views:
            assert v.dtype == torch.float32 and torch.isfinite(v).all()
            assert v.min() >= lo and v.max() <= hi and v.std() > 0


def test_deterministic_per_seed_epoch_index(folder: Path) -> None:
    index = scan_image_folder(folder)
    a = PILMultiCropDataset(index, SMALL, seed=5)
    b = PILMultiCropDataset(index, SMALL, seed=5)
    for va, vb in zip(a[4][0], b[4][0]):
        assert torch.equal(va, vb)
    b.set_epoch(1)
    assert not all(torch.equal(x, y) for x, y in zip(a[4][0], b[4][0]))
    assert all(torch.equal(x, y) for x, y in zip(a.load(4, epoch=1).views, b[4][0]))
    c = PILMultiCropDataset(index, SMALL, seed=6)
    assert not all(torch.equal(x, y) for x, y in zip(a[4][0], c[4][0]))


def test_return_params(folder: Path) -> None:
    ds = PILMultiCropDataset(scan_image_folder(folder), SMALL, seed=1, return_params=True)
    views, label, index, ok, params = ds[2]
    assert [p.size for p in params] == SMALL.view_sizes
    assert params == sample_params(SMALL, 1, 0, 2, 64, 48)  # the shared contract's draw


def test_flip_is_horizontal(tmp_path: Path) -> None:
    arr = np.zeros((48, 64, 3), np.uint8)
    arr[:, :32] = 255  # bright left half
    (tmp_path / "a").mkdir()
    Image.fromarray(arr).save(tmp_path / "a" / "x.png")
    index = scan_image_folder(tmp_path)
    full = PLAIN.replace(min_scale_crops=[1.0, 1.0], max_scale_crops=[1.0, 1.0], ratio=[4 / 3, 4 / 3])
    plain = PILMultiCropDataset(index, full)[0][0][0]
    flipped = PILMultiCropDataset(index, full.replace(flip_p=1.0))[0][0][0]
    assert plain[:, :, :8].mean() > 1.5 and plain[:, :, -8:].mean() < -1.5
    assert flipped[:, :, :8].mean() < -1.5 and flipped[:, :, -8:].mean() > 1.5
    # Same uniforms, only the flip differs: random crops are mirrored exactly.
    a = PILMultiCropDataset(scan_image_folder(tmp_path), PLAIN, seed=3)[0][0]
    b = PILMultiCropDataset(scan_image_folder(tmp_path), PLAIN.replace(flip_p=1.0), seed=3)[0][0]
    for x, y in zip(a, b):
        assert torch.equal(torch.flip(x, dims=[-1]), y)


def test_grayscale_has_equal_channels(folder: Path) -> None:
    spec = PLAIN.replace(grayscale_p=1.0, jitter_p=1.0)
    ds = PILMultiCropDataset(scan_image_folder(folder), spec)
    mean = torch.tensor(spec.mean).view(3, 1, 1)
    std = torch.tensor(spec.std).view(3, 1, 1)
    for v in ds[1][0]:
        raw = v * std + mean
        assert torch.allclose(raw[0], raw[1], atol=1e-5) and torch.allclose(raw[1], raw[2], atol=1e-5)
    colour = PILMultiCropDataset(scan_image_folder(folder), PLAIN)[1][0][0] * std + mean
    assert not torch.allclose(colour[0], colour[1], atol=1e-2)


def test_jitter_blur_solarize_change_pixels(folder: Path) -> None:
    index = scan_image_folder(folder)
    base = PILMultiCropDataset(index, PLAIN)[0][0]
    for change in ({"jitter_p": 1.0}, {"blur_p": 1.0}, {"solarize_p": 1.0}):
        other = PILMultiCropDataset(index, PLAIN.replace(**change))[0][0]
        assert all(a.shape == b.shape for a, b in zip(base, other))
        assert not torch.equal(base[0], other[0]), change


def _make_bad_files(root: Path) -> list[Path]:
    good = root / "class0" / "img0.jpg"
    data = good.read_bytes()
    bad = [root / "class0" / "img0a_empty.jpg", root / "class1" / "img0a_trunc.jpg", root / "class1" / "zz_text.JPG"]
    bad[0].write_bytes(b"")
    bad[1].write_bytes(data[: len(data) // 2])
    bad[2].write_text("this is not an image\n")
    return bad


def test_corrupt_files_are_replaced(folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad = _make_bad_files(folder)
    index = scan_image_folder(folder)
    ds = PILMultiCropDataset(index, SMALL)
    bad_idx = [i for i in range(len(ds)) if Path(ds.path(i)) in bad]
    assert len(bad_idx) == 3
    with caplog.at_level(logging.WARNING, logger="pipelines"):
        for i in bad_idx:
            views, label, index_out, ok = ds[i]
            assert not ok and index_out == i
            assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 2
            s = ds.load(i)
            assert s.bad_paths and Path(s.bad_paths[0]) == Path(ds.path(i))
        ds[bad_idx[0]]
    warned = [r for r in caplog.records if r.name == "pipelines" and "unreadable" in r.getMessage()]
    assert len(warned) == 3  # once per path, however often it is hit
    # the replacement is deterministic: the next decodable sample with its own stream
    j = bad_idx[0] + 1
    assert all(torch.equal(a, b) for a, b in zip(ds[bad_idx[0]][0], ds[j][0]))


def test_truncated_jpeg_bad_even_if_global_flag_set(folder: Path) -> None:
    bad = _make_bad_files(folder)
    old = ImageFile.LOAD_TRUNCATED_IMAGES
    try:
        ImageFile.LOAD_TRUNCATED_IMAGES = True
        with pytest.raises(OSError):
            decode_rgb(str(bad[1]))
        assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old


def test_oversized_image_is_bad(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pil_mod, "MAX_PIXELS", 64 * 48 - 1)
    ds = PILMultiCropDataset(scan_image_folder(folder), SMALL)
    with pytest.raises(Exception, match="consecutive unreadable"):
        ds[0]
    monkeypatch.setattr(pil_mod, "MAX_PIXELS", 10**9)
    assert ds[0][3]


@pytest.mark.parametrize("policy", ["replace", "skip"])
def test_batched_load_is_the_per_sample_load_bit_for_bit(folder: Path, policy: str) -> None:
    """The loader draws a batch's parameters in one call (``load_many``): the same samples,
    parameters, float32 bits and bad-file bookkeeping as one ``load`` per index, corrupt files included."""
    bad = _make_bad_files(folder)
    index = scan_image_folder(folder)
    one = PILMultiCropDataset(index, SMALL, seed=3, bad_samples=policy)
    many = PILMultiCropDataset(index, SMALL, seed=3, bad_samples=policy)
    order = [8, 0, 5, 2, 7, 1, 6, 3, 4]  # bad files among them (a replacement can repeat a good one)
    expected = [one.load(i, epoch=2) for i in order]
    assert sum(not s.ok for s in expected) == 3
    got = many.load_many(order, epoch=2)
    assert [(s.index, s.label, s.ok, s.bad_paths) for s in got] == \
        [(s.index, s.label, s.ok, s.bad_paths) for s in expected]
    for s, e in zip(got, expected):
        assert s.params == e.params and len(s.views) == len(e.views)
        assert all(v.dtype == torch.float32 and torch.equal(v, w) for v, w in zip(s.views, e.views))
    assert many.bad.summary() == one.bad.summary()
    with pytest.raises(IndexError):
        many.load_many([0, len(many)])


def test_normalise_is_the_formula_in_any_layout() -> None:
    """``(x / 255 - mean) / std`` on uint8 CHW, the same bits from an HWC buffer seen as CHW (what
    ``pil_to_tensor`` gives) as from a contiguous one, and equal to a float64 reference."""
    rng = np.random.default_rng(0)
    hwc = torch.from_numpy(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.228, 0.224, 0.225]).view(3, 1, 1)
    seen = hwc.permute(2, 0, 1)
    out = pil_mod.normalise(seen, mean, std)
    assert out.dtype == torch.float32 and out.is_contiguous() and out.shape == (3, 20, 24)
    assert torch.equal(out, pil_mod.normalise(seen.contiguous(), mean, std))
    ref = (seen.double() / 255 - mean.double()) / std.double()
    assert (out.double() - ref).abs().max() < 1e-6


def test_loader_batches_equal_per_sample_batches(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The PIL loader's batched fetch (``__getitems__``) and the DataLoader's one-key-at-a-time fetch
    give identical batches: views (bits and memory format), labels, indices and parameters."""
    from pipelines import build_loader
    from pipelines import loader as loader_mod

    spec = SMALL.replace(channels_last=True)

    def batches() -> list:
        ld = build_loader(folder, spec, batch_size=2, seed=4)
        ld.record_params = True
        ld.set_epoch(1)
        try:
            return list(ld)
        finally:
            ld.close()

    fast = batches()
    monkeypatch.setattr(loader_mod._EpochItems, "__getitems__", None)  # the fetcher's per-key path
    slow = batches()
    assert len(fast) == len(slow) == 3
    for a, b in zip(fast, slow):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.labels, b.labels)
        for x, y in zip(a.views, b.views):
            assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
            assert torch.equal(x, y) and x.stride() == y.stride()
        assert all(np.array_equal(getattr(p, f), getattr(q, f)) for p, q in zip(a.params, b.params)
                   for f in ("top", "left", "height", "width", "flip", "brightness", "hue", "jitter_order"))
