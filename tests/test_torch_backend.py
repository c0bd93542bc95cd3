"""The ``torch`` loader backend (CPU mode; CUDA tests are marked gpu): outputs, parity with the PIL
reference, augmentation statistics, sharding / resume, and unreadable files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pipelines.torch_backend as tb
from pipelines import MultiCropSpec, available_backends, build_loader, scan_image_folder
from pipelines.params import params_equal, sample_params_for_indices
from pipelines.torch_backend import (
    TorchLoader,
    crop_resize_flip,
    decode_images,
    make_canvases,
    resample_matrix,
)
from pipelines.formats.folder import read_file
from pipelines.formats.probe import jpeg_size as jpeg_header
from swav_fast.errors import ConfigError, DataError

# torchvision 0.29 deprecates its codecs (for torchcodec); the backend filters the warning at import, but
# pytest resets warning filters per test.
pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities:DeprecationWarning")
SPEC = MultiCropSpec(num_crops=[2, 2], size_crops=[32, 16])
PLAIN = SPEC.replace(flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)


def photo(w: int, h: int, seed: int) -> np.ndarray:
    """A smooth colour image with some texture (JPEG-friendly), uint8 [h, w, 3]."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = rng.uniform(40, 215, 3)
    img = base + 40 * np.sin(x[..., None] / rng.uniform(3, 9, 3) + rng.uniform(0, 6, 3)) \
        + 30 * np.cos(y[..., None] / rng.uniform(4, 11, 3)) + rng.normal(0, 6, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def write_jpeg(path: Path, w: int = 64, h: int = 48, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(photo(w, h, seed)).save(path, quality=90)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    for c in range(2):
        for k in range(8):
            write_jpeg(root / f"c{c}" / f"{k}.jpg", w=64 + 8 * (k % 3), h=48 + 4 * (k % 2), seed=10 * c + k)
    return root  # 16 images of 3 x 2 different sizes


def loader(folder: Path, spec: MultiCropSpec = SPEC, batch_size: int = 4, **kw) -> TorchLoader:
    return TorchLoader(scan_image_folder(folder), spec, batch_size, **kw)


def _rate_ok(hits: int, n: int, p: float) -> bool:
    return abs(hits / n - p) <= 4.5 * math.sqrt(p * (1 - p) / n) + 1e-12


# -- outputs -----------------------------------------------------------------------------------------
def test_registered_shapes_and_epoch_cover(folder: Path) -> None:
    assert "torch" in available_backends()
    ld = build_loader(folder, SPEC, 4, backend="torch")
    assert isinstance(ld, TorchLoader)
    assert len(ld) == 4 and ld.classes == ["c0", "c1"]
    batches = list(ld)
    assert len(batches) == 4
    lo = min((0 - m) / s for m, s in zip(SPEC.mean, SPEC.std)) - 1e-4
    hi = max((1 - m) / s for m, s in zip(SPEC.mean, SPEC.std)) + 1e-4
    for b in batches:
        assert [tuple(v.shape) for v in b.views] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 2
        for v in b.views:
            assert v.dtype == torch.float32 and v.is_contiguous() and torch.isfinite(v).all()
            assert v.min() >= lo and v.max() <= hi and v.std() > 0.05
        assert b.labels.dtype == torch.int64 and torch.equal(b.labels, b.indices // 8) and b.num_bad == 0
    assert sorted(torch.cat([b.indices for b in batches]).tolist()) == list(range(16))
    ld.close()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dtype_and_channels_last(folder: Path, dtype: str) -> None:
    spec = SPEC.replace(dtype=dtype, channels_last=True)
    ld = loader(folder, spec)
    b = next(iter(ld))
    ref = next(iter(loader(folder, SPEC)))
    for v, r in zip(b.views, ref.views):
        assert v.dtype == getattr(torch, dtype) and v.is_contiguous(memory_format=torch.channels_last)
        assert (v.float() - r).abs().max() < 0.05  # same draws, only the output format differs
    ld.close()


def test_crop_resize_flip_matches_pil_reference(folder: Path) -> None:
    """The shared draws give the PIL backend's exact crops: pixels agree to ~1/255 (PIL rounds in uint8)."""
    spec = PLAIN.replace(flip_p=0.5)
    pil = build_loader(folder, spec, 4, backend="pil", seed=3)
    tl = loader(folder, spec, seed=3)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    for a, b in zip(pil, tl):
        assert torch.equal(a.indices, b.indices)
        for u, v in zip(a.views, b.views):
            d = ((u - v) * std).abs()
            assert d.max() <= 1.01 / 255 and d.mean() < 0.2 / 255
    tl.close()


def test_full_augmentation_close_to_pil_reference(folder: Path) -> None:
    """Documented tolerance of the whole chain vs PIL (same params): per-view mean absolute difference
    (on the [0, 1] scale) median < 0.03, 90th percentile < 0.1 -- the hue rotation vs PIL's HSV shift
    and the propagated contrast mean after clipping; crop, flip, grayscale and blur agree to ~1/255."""
    pil = build_loader(folder, SPEC, 8, backend="pil", seed=1)
    tl = loader(folder, SPEC, batch_size=8, seed=1)
    std = torch.tensor(SPEC.std).view(1, 3, 1, 1)
    errs = []
    for epoch in range(2):
        pil.set_epoch(epoch)
        tl.set_epoch(epoch)
        for a, b in zip(pil, tl):
            for u, v in zip(a.views, b.views):
                errs += ((u - v) * std).abs().mean(dim=(1, 2, 3)).tolist()
    assert len(errs) == 2 * 16 * 4
    assert np.median(errs) < 0.03 and np.percentile(errs, 90) < 0.1
    tl.close()


def test_resize_matrix_against_pil_on_mixed_sizes() -> None:
    """Direct check of crop_resize_flip on images of very different sizes (several canvases), up- and
    down-scaling boxes, flips: each view equals PIL's crop + bilinear resize (+ mirror) to 1/255."""
    rng = np.random.default_rng(0)
    sizes = [(40, 30), (64, 48), (200, 20), (23, 61), (64, 50)]
    arrs = [photo(w, h, i) for i, (w, h) in enumerate(sizes)]
    canv = make_canvases([torch.from_numpy(a).permute(2, 0, 1).contiguous() for a in arrs])
    assert len(canv.chunks) >= 2 and sorted(np.concatenate(canv.ids).tolist()) == list(range(5))
    v, n, s = 3, len(sizes), 16
    top, left, hh, ww = (np.zeros((v, n), np.int64) for _ in range(4))
    flip = rng.random((v, n)) < 0.5
    for i, (w, h) in enumerate(sizes):
        for k in range(v):
            hh[k, i], ww[k, i] = rng.integers(4, h + 1), rng.integers(4, w + 1)
            top[k, i], left[k, i] = rng.integers(0, h - hh[k, i] + 1), rng.integers(0, w - ww[k, i] + 1)
    out = crop_resize_flip(canv, top, left, hh, ww, flip, s)
    assert out.shape == (v, n, 3, s, s) and out.dtype == torch.uint8
    for i in range(n):
        for k in range(v):
            x0, y0 = left[k, i], top[k, i]
            ref = Image.fromarray(arrs[i]).crop((x0, y0, x0 + ww[k, i], y0 + hh[k, i]))
            ref = ref.resize((s, s), Image.Resampling.BILINEAR)
            if flip[k, i]:
                ref = ref.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            diff = (out[k, i].permute(1, 2, 0).int() - torch.from_numpy(np.array(ref)).int()).abs()
            assert diff.max() <= 1, (i, k)


def test_resample_matrix_rows() -> None:
    m = resample_matrix(torch.tensor([3, 0]), torch.tensor([8, 4]), 12, 4, flip=torch.tensor([False, True]))
    assert m.shape == (2, 4, 12)
    assert torch.allclose(m.sum(dim=2), torch.ones(2, 4))
    assert (m[0, :, :3] == 0).all() and (m[0, :, 11:] == 0).all()  # nothing outside [3, 11)
    # 2x shrink: triangle of half-width 2 around centres 4, 6, 8, 10 (pixel centres x + 1/2)
    assert torch.allclose(m[0, 0, 3:6], torch.tensor([0.375 / 1.0, 0.375, 0.125]) / 0.875, atol=1e-6)
    assert torch.equal(m[1], torch.eye(4, 12).flip(0))  # same size: the identity, mirrored


# -- statistics of the emitted augmentations ----------------------------------------------------------
def _collect(folder: Path, spec: MultiCropSpec, epochs: int, seed: int = 0) -> list[list[torch.Tensor]]:
    ld = loader(folder, spec, batch_size=8, seed=seed)
    views: list[list[torch.Tensor]] = [[] for _ in range(spec.num_views)]
    for e in range(epochs):
        ld.set_epoch(e)
        for b in ld:
            for v in range(spec.num_views):
                views[v].append(b.views[v])
    ld.close()
    return [list(torch.cat(v)) for v in views]


def test_output_rates_flip_grayscale_jitter_blur(folder: Path) -> None:
    """Rates measured on the emitted pixels over 640 views: the same uniforms drive every variant of the
    spec below, so a view differs from its plain twin exactly when it drew the augmentation."""
    epochs = 10
    plain = _collect(folder, PLAIN, epochs)
    n = sum(len(v) for v in plain)
    assert n == 10 * 16 * 4

    def rate(spec: MultiCropSpec, changed) -> int:
        other = _collect(folder, spec, epochs)
        return sum(bool(changed(a, b)) for va, vb in zip(plain, other) for a, b in zip(va, vb))

    flips = rate(PLAIN.replace(flip_p=0.5), lambda a, b: not torch.equal(a, b))
    mirrored = rate(PLAIN.replace(flip_p=1.0), lambda a, b: torch.equal(a.flip(-1), b))
    gray = rate(PLAIN.replace(grayscale_p=0.2), lambda a, b: torch.allclose(b[0] * 0.228 + 0.485, b[1] * 0.224
                                                                            + 0.456, atol=1e-5))
    jitter = rate(PLAIN.replace(jitter_p=0.8), lambda a, b: not torch.equal(a, b))
    blur = rate(PLAIN.replace(blur_p=0.5), lambda a, b: (a - b).abs().max() > 1e-3)
    assert _rate_ok(flips, n, 0.5) and mirrored == n
    assert _rate_ok(gray, n, 0.2) and _rate_ok(jitter, n, 0.8)
    # sigma ~ U(0.1, 2); below ~0.25 a blur moves no pixel by 1e-3 -- so expect P(blur) * P(sigma > ~0.25)
    assert _rate_ok(blur, n, 0.5 * (2.0 - 0.25) / 1.9)


def test_backend_draws_are_the_shared_generators(folder: Path) -> None:
    """Stage 3 is the one generator of pipelines.params (its statistics: tests/test_randomness.py): per
    crop group, the views' parameters of each decoded sample, whatever the batch number."""
    spec = MultiCropSpec()  # 2 x 224 + 6 x 96
    ld = loader(folder, spec, batch_size=16)
    imgs = [torch.zeros(3, 375 + 5 * (k % 2), 500, dtype=torch.uint8) for k in range(16)]
    sources = np.arange(16)[::-1].copy()
    dec = tb.DecodedBatch(imgs, sources, np.ones(16, bool), [])
    groups = ld.params(3, 7, dec)
    assert [len(g) for g in groups] == [2 * 16, 6 * 16]
    assert all(params_equal(a, b) for a, b in zip(groups, ld.params(3, 0, dec)))
    ref = sample_params_for_indices(spec, 0, 3, sources, [500] * 16, [375 + 5 * (k % 2) for k in range(16)])
    assert all(params_equal(a, b) for a, b in zip(tb.view_params(spec, groups), ref))
    ld.close()


# -- order, sharding, determinism, resume --------------------------------------------------------------
def test_sharding_reshuffle_and_determinism(folder: Path) -> None:
    r0, r1 = (loader(folder, batch_size=2, rank=r, world_size=2, seed=4) for r in (0, 1))
    i0 = torch.cat([b.indices for b in r0]).tolist()
    i1 = torch.cat([b.indices for b in r1]).tolist()
    assert not set(i0) & set(i1) and sorted(i0 + i1) == list(range(16))
    r0.set_epoch(1)
    assert torch.cat([b.indices for b in r0]).tolist() != i0
    a, b = loader(folder, seed=4), loader(folder, seed=4)
    for x, y in zip(a, b):
        assert torch.equal(x.indices, y.indices) and all(torch.equal(u, v) for u, v in zip(x.views, y.views))
    c = loader(folder, seed=5)
    assert not torch.equal(next(iter(a)).views[0], next(iter(c)).views[0])
    for ld in (r0, r1, a, b, c):
        ld.close()


def test_exact_resume_from_start_batch(folder: Path) -> None:
    ld = loader(folder, seed=2)
    ld.set_epoch(3)
    full = list(ld)
    ld.set_epoch(3, start_batch=2)
    tail = list(ld)
    assert len(tail) == 2
    for x, y in zip(full[2:], tail):
        assert torch.equal(x.indices, y.indices) and all(torch.equal(u, v) for u, v in zip(x.views, y.views))
    ld.close()


def test_early_break_then_full_pass(folder: Path) -> None:
    ld = loader(folder, batch_size=2, prefetch=1)
    for _ in ld:
        break
    assert len(list(ld)) == 8
    ld.close()


# -- bad files ------------------------------------------------------------------------------------------
def test_corrupt_files_are_replaced_and_counted(folder: Path) -> None:
    good = (folder / "c0" / "0.jpg").read_bytes()
    (folder / "c0" / "0.jpg").write_bytes(good[: len(good) // 2])            # truncated
    (folder / "c0" / "1.jpg").write_bytes(b"this is not a jpeg at all")      # garbage
    (folder / "c1" / "2.jpg").write_bytes(b"")                               # empty
    (folder / "c1" / "3.jpg").write_bytes(good[:2] + b"\xff\xfe" + good[4:200])  # header, no scan
    Image.fromarray(photo(50, 40, 99)).save(folder / "c1" / "z.png")          # a valid PNG: not bad
    ld = loader(folder, batch_size=17, drop_last=False)
    bad_names = {"c0/0.jpg", "c0/1.jpg", "c1/2.jpg", "c1/3.jpg"}
    batches = list(ld)
    assert sum(b.num_bad for b in batches) == 4 == ld.num_bad
    assert {str(Path(p).relative_to(folder)) for p in ld.bad_paths} == bad_names
    total = sum(len(b) for b in batches)
    assert total == 17
    for b in batches:
        for v in b.views:
            assert torch.isfinite(v).all()
    ld.close()


def test_all_bad_raises_data_error(tmp_path: Path) -> None:
    for k in range(3):
        (tmp_path / "c" / f"{k}.jpg").parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "c" / f"{k}.jpg").write_bytes(b"\xff\xd8\xff\xe0broken")
    ld = loader(tmp_path, batch_size=1)
    with pytest.raises(DataError, match="consecutive unreadable images"):
        list(ld)
    ld.close()


def test_jpeg_header(tmp_path: Path) -> None:
    write_jpeg(tmp_path / "a.jpg", 70, 50)
    data = read_file(str(tmp_path / "a.jpg"))
    assert jpeg_header(data) == (70, 50)
    with pytest.raises(DataError, match="truncated"):
        jpeg_header(data[:-200])
    sof = next(i for i in range(2, len(data) - 1) if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC2))
    bomb = bytearray(data)
    bomb[sof + 5:sof + 9] = (30000).to_bytes(2, "big") + (30000).to_bytes(2, "big")
    with pytest.raises(DataError, match="pixel"):
        jpeg_header(bomb)
    imgs, errs = decode_images([data, bytes(bomb), OSError("gone")], "cpu")
    assert imgs[0] is not None and tuple(imgs[0].shape) == (3, 50, 70) and errs[0] is None
    assert imgs[1] is None and "pixel" in (errs[1] or "") and "gone" in (errs[2] or "")


def test_grayscale_jpeg_decodes_to_rgb(tmp_path: Path) -> None:
    Image.fromarray(photo(30, 20, 0)[..., 0]).save(tmp_path / "g.jpg")
    imgs, errs = decode_images([read_file(str(tmp_path / "g.jpg"))], "cpu")
    assert errs == [None] and imgs[0] is not None and imgs[0].shape == (3, 20, 30)
    assert torch.equal(imgs[0][0], imgs[0][1])


def test_bad_arguments(folder: Path) -> None:
    with pytest.raises(ConfigError, match="prefetch"):
        TorchLoader(scan_image_folder(folder), SPEC, 4, prefetch=0)
    with pytest.raises(ConfigError, match="num_workers"):
        TorchLoader(scan_image_folder(folder), SPEC, 4, num_workers=-1)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            TorchLoader(scan_image_folder(folder), SPEC, 4, device="cuda")


# -- CUDA ----------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_cuda_matches_cpu(folder: Path) -> None:
    """Same host draws on both devices: nvJPEG vs libjpeg-turbo and the fp16 resize differ by a few 1/255."""
    spec = SPEC.replace(blur_p=0.5, solarize_p=0.1)
    cpu = loader(folder, spec, seed=7)
    gpu = loader(folder, spec, seed=7, device="cuda")
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    for a, b in zip(cpu, gpu):
        assert torch.equal(a.indices, b.indices.cpu())
        for u, v in zip(a.views, b.views):
            assert v.device.type == "cuda"
            d = ((u - v.cpu()) * std).abs()
            # nvJPEG vs libjpeg-turbo and fp16 resize rounding only
            assert d.mean() < 3 / 255 and d.mean(dim=(1, 2, 3)).max() < 10 / 255
    cpu.close()
    gpu.close()


@pytest.mark.gpu
def test_cuda_bf16_channels_last_prefetch_and_bad_files(folder: Path) -> None:
    good = (folder / "c0" / "0.jpg").read_bytes()
    (folder / "c0" / "0.jpg").write_bytes(good[: len(good) // 2])
    spec = SPEC.replace(dtype="bfloat16", channels_last=True)
    ld = loader(folder, spec, batch_size=8, device="cuda", prefetch=3)
    seen = 0
    for epoch in range(3):
        ld.set_epoch(epoch)
        for b in ld:
            for v in b.views:
                assert v.is_cuda and v.dtype == torch.bfloat16
                assert v.is_contiguous(memory_format=torch.channels_last)
                assert torch.isfinite(v.float()).all()
            # work on the consumer stream while the loader prefetches on its own
            torch.stack([v.float().mean() for v in b.views]).sum().item()
            seen += len(b)
    assert seen == 48 and ld.num_bad == 3
    ld.close()


@pytest.mark.gpu
def test_cuda_batched_decode_falls_back_per_image(folder: Path) -> None:
    datas = [read_file(str(p)) for p in sorted(folder.rglob("*.jpg"))]
    datas[1] = datas[1][:-100]  # truncated: rejected before nvJPEG
    datas[2] = bytearray(datas[2])
    datas[2][600:800] = b"\x00" * 200  # damaged scan data
    imgs, errs = decode_images(datas, "cuda")
    assert imgs[0] is not None and imgs[0].is_cuda and errs[1] is not None
    assert all(im is not None for k, im in enumerate(imgs) if k not in (1, 2))


# -- the benchmark script (a smoke run on CPU, not a timing) ---------------------------------------------
def test_bench_loader_runs_and_writes_json(folder: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    import json

    from benchmarks.bench_loader import main

    out = tmp_path / "bench.json"
    assert main(["--data", str(folder), "--backends", "pil,torch", "--device", "cpu", "--batch-size", "4",
                 "--batches", "1", "--warmup", "1", "--workers", "0", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "decode img/s" in text and "torch" in text and "pil" in text
    rec = json.loads(out.read_text())
    assert rec["benchmark"] == "loader" and rec["config"]["batch_size"] == 4 and rec["env"]["torch"]
    rows = {r["backend"]: r for r in rec["results"]}
    for name in ("pil", "torch"):
        assert all(rows[name][k] > 0 for k in ("read", "decode", "augment", "total")), rows[name]
