"""The one randomness contract (:mod:`pipelines.params`): every augmentation parameter of sample ``i`` in
epoch ``e`` is a function of ``(seed, e, i, view)`` and the image size, drawn the same way by every
backend.

(c) statistics of the one generator (uniformity, independence across slots / views / samples / epochs /
seeds, the crop rule against torchvision's, the rates and ranges of every parameter); (a) the same seed
gives equal parameters on pil, torch and DALI and pixels within the interpolation tolerance; (b) a
resumed epoch (a fresh loader started at a batch) gives exactly the views of the uninterrupted one, on
every backend.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import MultiCropSpec, build_loader, scan_image_folder
from pipelines.loader import MultiCropBatch
from pipelines.params import (
    JITTER_ORDERS,
    NUM_UNIFORMS,
    crop_boxes_for_indices,
    params_equal,
    params_from_uniforms,
    sample_params,
    sample_params_for_indices,
    sample_uniforms,
    stack_rows,
    view_uniforms,
)

pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities:DeprecationWarning",
    "ignore::pytest.PytestUnraisableExceptionWarning")  # numba's dispatcher finalizer under FFCV

SMALL = MultiCropSpec(num_crops=[2, 2], size_crops=[32, 16])
CROP_ONLY = SMALL.replace(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)  # crop, resize, flip


def _rate_ok(hits: int, n: int, p: float) -> bool:
    """``hits`` of ``n`` within 4.5 binomial standard deviations of ``n p``."""
    return abs(hits / n - p) <= 4.5 * math.sqrt(p * (1 - p) / n) + 1e-12


def _corr_small(a: np.ndarray, b: np.ndarray) -> bool:
    """Pearson correlation within 5 standard errors (1 / sqrt(n)) of 0."""
    return abs(float(np.corrcoef(a.ravel(), b.ravel())[0, 1])) < 5.0 / math.sqrt(a.size)


# -- (c) the generator ---------------------------------------------------------------------------------------
def test_uniforms_are_a_pure_function_of_seed_epoch_index_view() -> None:
    idx = np.array([0, 7, 3, 1_281_166, 2**40])
    u = view_uniforms(5, 2, idx, 3)
    assert u.shape == (5, NUM_UNIFORMS) and u.dtype == np.float64
    assert np.array_equal(u, view_uniforms(5, 2, idx, 3))
    # one sample alone, in another order, or among others: the same values
    for j, i in enumerate(idx):
        assert np.array_equal(view_uniforms(5, 2, [i], 3)[0], u[j])
    assert np.array_equal(view_uniforms(5, 2, idx[::-1], 3), u[::-1])
    all_views = sample_uniforms(5, 2, idx, 4)
    assert all_views.shape == (4, 5, NUM_UNIFORMS) and np.array_equal(all_views[3], u)
    # changing any one key changes every value
    for other in (view_uniforms(6, 2, idx, 3), view_uniforms(5, 3, idx, 3), view_uniforms(5, 2, idx + 1, 3),
                  view_uniforms(5, 2, idx, 2)):
        assert not np.isclose(other, u).any()
    with pytest.raises(ValueError, match=">= 0"):
        view_uniforms(0, 0, [-1], 0)


def test_uniforms_are_uniform() -> None:
    u = sample_uniforms(0, 0, np.arange(4000), 2).reshape(-1)  # 264,000 values
    assert u.min() >= 0.0 and u.max() < 1.0
    n = u.size
    assert abs(u.mean() - 0.5) < 5 * math.sqrt(1 / 12 / n)
    assert abs(u.var() - 1 / 12) < 5 * math.sqrt(1 / 180 / n)  # Var(U^2 - ...) of a uniform: 1/180
    # chi-square over 100 equal bins, 99 degrees of freedom: mean 99, sd 14; 99 + 5 sd = 169
    counts = np.histogram(u, bins=100, range=(0.0, 1.0))[0]
    chi2 = float(((counts - n / 100) ** 2 / (n / 100)).sum())
    assert chi2 < 169, chi2
    # Kolmogorov-Smirnov distance, 1.95 / sqrt(n) is the 0.1% critical value
    s = np.sort(u)
    d = max(np.max(np.arange(1, n + 1) / n - s), np.max(s - np.arange(n) / n))
    assert d < 1.95 / math.sqrt(n), d


def test_uniforms_are_independent_across_slots_views_samples_epochs_seeds() -> None:
    n = 20000
    idx = np.arange(n)
    u = sample_uniforms(1, 0, idx, 3)  # [3, n, 33]
    assert _corr_small(u[0, :, 0], u[0, :, 1])            # neighbouring slots
    assert _corr_small(u[0, :, 22], u[0, :, 23])          # flip vs jitter
    assert _corr_small(u[0], u[1])                        # views of one sample
    assert _corr_small(u[0, :-1], u[0, 1:])               # consecutive sample indices
    assert _corr_small(u[0], sample_uniforms(1, 1, idx, 1)[0])  # consecutive epochs
    assert _corr_small(u[0], sample_uniforms(2, 0, idx, 1)[0])  # consecutive seeds
    # joint uniformity of two slots on a 10 x 10 grid (chi-square, 99 dof: < 99 + 5 * 14)
    joint = np.histogram2d(u[0, :, 0], u[0, :, 1], bins=10, range=[[0, 1], [0, 1]])[0]
    assert float(((joint - n / 100) ** 2 / (n / 100)).sum()) < 169
    # the flags of two views of one sample are independent: P(flip_0 and flip_1) = 1/4
    both = int(((u[0, :, 22] < 0.5) & (u[1, :, 22] < 0.5)).sum())
    assert _rate_ok(both, n, 0.25)


@pytest.mark.parametrize("view", [0, 2])  # a global and a local view of the default spec
def test_parameter_rates_and_ranges(view: int) -> None:
    spec = MultiCropSpec(solarize_p=0.2)
    W, H, n = 500, 375, 4000
    p = sample_params_for_indices(spec, 7, 0, np.arange(n), np.full(n, W), np.full(n, H))[view]
    assert len(p) == n and p.size == spec.view_sizes[view] and p.jitter_order.shape == (n, 4)
    assert (p.top >= 0).all() and (p.top + p.height <= H).all()
    assert (p.left >= 0).all() and (p.left + p.width <= W).all()
    for name, prob in (("flip", 0.5), ("jitter", 0.8), ("grayscale", 0.2), ("solarize", 0.2)):
        assert _rate_ok(int(getattr(p, name).sum()), n, prob), name
    assert _rate_ok(int((p.blur_sigma > 0).sum()), n, 0.5)
    sig = p.blur_sigma[p.blur_sigma > 0]
    assert sig.min() >= 0.1 and sig.max() <= 2.0 and sig.min() < 0.3 and sig.max() > 1.8
    j = p.jitter
    for f in (p.brightness, p.contrast, p.saturation):
        assert f[j].min() >= 0.2 and f[j].max() <= 1.8 and f[j].min() < 0.3 and f[j].max() > 1.7
        assert abs(f[j].mean() - 1.0) < 0.03 and (f[~j] == 1).all()
    assert np.abs(p.hue[j]).max() <= 0.2 and abs(p.hue[j].mean()) < 0.02 and (p.hue[~j] == 0).all()
    assert {tuple(r) for r in p.jitter_order[j]} == {tuple(r) for r in JITTER_ORDERS}
    assert (p.jitter_order[~j] == np.arange(4)).all()


@pytest.mark.parametrize("view", [0, 2])
def test_crop_boxes_follow_torchvisions_rule(view: int) -> None:
    """Area fraction and aspect ratio against ``RandomResizedCrop.get_params`` on the same image size:
    histograms agree bin by bin (binomial), bounds hold."""
    from torchvision.transforms import RandomResizedCrop

    spec = MultiCropSpec()
    W, H, n = 500, 375, 6000
    p = sample_params_for_indices(spec, 1, 0, np.arange(n), np.full(n, W), np.full(n, H))[view]
    lo, hi = spec.scale_range(view)
    area = p.height * p.width / (W * H)
    aspect = p.width / p.height
    assert area.min() >= lo * 0.97 and area.max() <= hi * 1.03
    assert aspect.min() >= 0.75 * 0.98 and aspect.max() <= 4 / 3 * 1.02
    with torch.random.fork_rng():
        torch.manual_seed(0)
        ref = np.array([RandomResizedCrop.get_params(torch.empty(3, H, W), [lo, hi], [3 / 4, 4 / 3])
                        for _ in range(n)], dtype=np.float64)
    ref_area, ref_aspect = ref[:, 2] * ref[:, 3] / (W * H), ref[:, 3] / ref[:, 2]
    log_ratio = np.linspace(np.log(3 / 4), np.log(4 / 3), 6)
    for ours, theirs, edges in ((area, ref_area, np.linspace(lo, hi, 6)),
                                (np.log(aspect), np.log(ref_aspect), log_ratio)):
        expected = np.histogram(np.clip(theirs, edges[0], edges[-1]), bins=edges)[0] / n
        observed = np.histogram(np.clip(ours, edges[0], edges[-1]), bins=edges)[0]
        for k, e in zip(observed, expected):
            # both samples are random: the difference has twice the binomial variance
            assert abs(k / n - e) <= 4.5 * math.sqrt(2 * e * (1 - e) / n) + 1e-9, (observed, expected * n)
    # top/left uniform over the free range: the centre's mean sits in the middle of the image
    cx = (p.left + p.width / 2) / W
    assert abs(cx.mean() - 0.5) < 0.02


def test_crop_fallback_is_torchvisions_central_crop() -> None:
    spec = MultiCropSpec(min_scale_crops=[1.0, 0.05], max_scale_crops=[1.0, 0.14])
    p = sample_params(spec, 0, 0, 0, 400, 40)[0]  # 10:1 image: scale 1 never fits the ratio range
    assert (p.height, p.width) == (40, round(40 * 4 / 3)) and p.top == 0 and p.left == (400 - p.width) // 2
    tall = sample_params(spec, 0, 0, 0, 40, 400)[0]
    assert (tall.height, tall.width) == (round(40 / 0.75), 40) and tall.top == (400 - tall.height) // 2


def test_batch_draw_equals_per_sample_draw() -> None:
    """Vectorised over a batch (torch, DALI, FFCV) or one sample at a time (pil): the same parameters,
    whatever else is in the batch."""
    spec = MultiCropSpec()
    idx, widths, heights = [5, 9, 11], [500, 300, 64], [375, 400, 48]
    per_view = sample_params_for_indices(spec, 3, 2, idx, widths, heights)
    for j, (i, w, h) in enumerate(zip(idx, widths, heights)):
        assert [per_view[v].row(j) for v in range(spec.num_views)] == sample_params(spec, 3, 2, i, w, h)
    other = sample_params_for_indices(spec, 3, 2, [11, 0, 5], [64, 10, 500], [48, 10, 375])
    assert other[4].row(0) == per_view[4].row(2) and other[4].row(2) == per_view[4].row(0)
    assert all(params_equal(stack_rows([p.row(j) for j in range(3)]), p) for p in per_view)
    # the crop-only draw (FFCV's per-epoch table) gives the same boxes, chunked or not
    many = np.arange(1000)[::-1]
    sizes = np.random.default_rng(0).integers(20, 600, (2, 1000))
    full = sample_params_for_indices(spec, 3, 2, many, sizes[0], sizes[1])
    boxes = crop_boxes_for_indices(spec, 3, 2, many, sizes[0], sizes[1], chunk=64)
    for v, p in enumerate(full):
        assert np.array_equal(boxes[v], np.stack([p.top, p.left, p.height, p.width], axis=1))
    # the uniforms -> parameters map is the documented one
    u = view_uniforms(3, 2, idx, 1)
    assert params_equal(params_from_uniforms(spec, 1, np.array(widths), np.array(heights), u), per_view[1])


# -- (a) the same parameters and pixels on pil, torch and DALI -----------------------------------------------
@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """12 textured JPEGs of 3 sizes in 2 classes."""
    root = tmp_path_factory.mktemp("rng") / "data"
    rng = np.random.default_rng(0)
    for k in range(12):
        w, h = [(64, 48), (72, 52), (56, 64)][k % 3]
        y, x = np.mgrid[0:h, 0:w]
        img = rng.uniform(40, 215, 3) + 50 * np.sin(x[..., None] / rng.uniform(3, 9, 3)) \
            + 30 * np.cos(y[..., None] / rng.uniform(4, 11, 3)) + rng.normal(0, 6, (h, w, 3))
        (root / f"c{k // 6}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / f"c{k // 6}" / f"{k:02d}.jpg",
                                                                     quality=90)
    return root


def _dali_ok() -> bool:
    from pipelines.dali_backend import dali_available

    return dali_available()


BACKENDS = ["pil", "torch", "dali"]


def _loader(name: str, source: Path, spec: MultiCropSpec, batch_size: int, seed: int, **kw):
    if name == "dali" and not _dali_ok():
        pytest.fail("nvidia-dali is not installed (pip install -e '.[dali]')")
    extra = {"num_workers": 1} if name == "dali" else {}
    ld = build_loader(source, spec, batch_size, backend=name, seed=seed, **extra, **kw)
    ld.record_params = True
    return ld


def _pass(ld, epoch: int, start_batch: int = 0) -> list[MultiCropBatch]:
    ld.set_epoch(epoch, start_batch)
    return list(ld)


def test_same_seed_same_parameters_on_pil_torch_dali(folder: Path) -> None:
    spec = SMALL.replace(solarize_p=0.3)
    runs = {}
    for name in BACKENDS:
        ld = _loader(name, folder, spec, 4, seed=9)
        runs[name] = [_pass(ld, e) for e in (0, 1)]
        ld.close()
    index = scan_image_folder(folder)
    sizes = {}
    for name in BACKENDS:
        for e in (0, 1):
            batches = runs[name][e]
            assert len(batches) == 3
            for b, ref in zip(batches, runs["pil"][e]):
                assert torch.equal(b.indices, ref.indices) and b.params is not None
                assert all(params_equal(p, q) for p, q in zip(b.params, ref.params)), name
                # ... and they are the contract's draws for these samples
                for j, i in enumerate(b.indices.tolist()):
                    if i not in sizes:
                        with Image.open(index.path(i)) as im:
                            sizes[i] = im.size
                    assert [p.row(j) for p in b.params] == sample_params(spec, 9, e, i, *sizes[i])
    # epochs draw differently
    assert not params_equal(runs["pil"][0][0].params[0], runs["pil"][1][0].params[0])


def test_same_seed_pixels_within_interpolation_tolerance(folder: Path) -> None:
    """Crop + resize + flip: torch equals PIL to PIL's uint8 rounding (1/255), DALI to its bilinear
    filter's (a few 1/255). The whole chain: torch's and DALI's colour ops (one GPU kernel) are within
    the documented tolerance of PIL's (median per-view mean absolute difference < 0.03 of 1)."""
    std = torch.tensor(SMALL.std).view(1, 3, 1, 1)
    out = {}
    for spec_name, spec in (("crop", CROP_ONLY), ("full", SMALL)):
        for name in BACKENDS:
            ld = _loader(name, folder, spec, 6, seed=4)
            out[spec_name, name] = _pass(ld, 0)
            ld.close()
    for name, worst, mean in (("torch", 1.01 / 255, 0.2 / 255), ("dali", 8 / 255, 1.0 / 255)):
        for a, b in zip(out["crop", "pil"], out["crop", name]):
            for u, v in zip(a.views, b.views):
                d = ((u - v) * std).abs()
                assert d.max() <= worst and d.mean() < mean, (name, 255 * d.max(), 255 * d.mean())
        errs = [float(e) for a, b in zip(out["full", "pil"], out["full", name])
                for u, v in zip(a.views, b.views) for e in ((u - v) * std).abs().mean(dim=(1, 2, 3))]
        assert len(errs) == 12 * 4 and np.median(errs) < 0.03 and np.percentile(errs, 90) < 0.1, name


# -- (b) exact resume on every backend -----------------------------------------------------------------------
def _assert_same_batches(full: list[MultiCropBatch], tail: list[MultiCropBatch]) -> None:
    assert len(tail) == len(full) and len(tail) > 0
    for x, y in zip(full, tail):
        assert torch.equal(x.indices, y.indices) and torch.equal(x.labels, y.labels)
        assert all(params_equal(p, q) for p, q in zip(x.params, y.params))
        assert all(torch.equal(u, w) for u, w in zip(x.views, y.views))


@pytest.mark.parametrize("name", BACKENDS)
def test_exact_resume(folder: Path, name: str) -> None:
    """A run stopped after 1 batch of epoch 1 and resumed by a fresh loader at batch 1 sees exactly the
    views of the uninterrupted epoch's remaining batches."""
    ld = _loader(name, folder, SMALL, 4, seed=2)
    _pass(ld, 0)
    full = _pass(ld, 1)
    ld.set_epoch(1)
    next(iter(ld))  # stopped mid-epoch
    ld.close()
    fresh = _loader(name, folder, SMALL, 4, seed=2)
    _assert_same_batches(full[1:], _pass(fresh, 1, start_batch=1))
    fresh.close()
@pytest.fixture(scope="module")
def beton(folder: Path, tmp_path_factory) -> Path:
    from swav_fast.prepare import prepare_dataset

    out = tmp_path_factory.mktemp("rng_beton")
    prepare_dataset(folder, out, "beton", quality=95, workers=1, progress=False)
    return out / "train"


def test_exact_resume_ffcv(beton: Path) -> None:
    from pipelines.ffcv_backend import open_beton_index

    index = open_beton_index(beton)
    ld = _loader("ffcv", beton, SMALL, 4, seed=2)
    full = _pass(ld, 1)
    ld.set_epoch(1)
    next(iter(ld))
    fresh = _loader("ffcv", beton, SMALL, 4, seed=2)
    _assert_same_batches(full[1:], _pass(fresh, 1, start_batch=1))
    # FFCV's crops are the contract's: the recorded boxes are the shared draw for the stored image sizes
    for b in full:
        idx = b.indices.numpy()
        ref = sample_params_for_indices(SMALL, 2, 1, idx, index.widths[idx], index.heights[idx])
        assert all(params_equal(p, q) for p, q in zip(b.params, ref))


def test_parameters_do_not_depend_on_rank_world_size_or_workers(folder: Path) -> None:
    """A sample's parameters are its own: the same on rank 1 of 2 (torch) and in a single process with
    DataLoader workers (pil), so changing the world size or the worker count keeps every sample's views."""
    single = _loader("pil", folder, SMALL, 2, seed=6, num_workers=1)
    by_index = {}
    for b in _pass(single, 3):
        for j, i in enumerate(b.indices.tolist()):
            by_index[i] = [p.row(j) for p in b.params]
    single.close()
    assert len(by_index) == 12
    rank1 = _loader("torch", folder, SMALL, 2, seed=6, rank=1, world_size=2)
    seen = 0
    for b in _pass(rank1, 3):
        for j, i in enumerate(b.indices.tolist()):
            assert [p.row(j) for p in b.params] == by_index[i]
            seen += 1
    rank1.close()
    assert seen == 6
