"""The built-in synthetic dataset: layout, manifest, determinism, cache, realism, learnability, CLI."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from swav_fast import cli
from swav_fast.data import synthetic
from swav_fast.data.synthetic import class_family, generate_synthetic, render_image
from swav_fast.errors import DataError

SMALL = (96, 72)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.jpg"))}


# ----------------------------------------------------------------------------- layout / manifest
def test_layout_balanced_counts_and_manifest(tmp_path):
    out = tmp_path / "ds"
    m = generate_synthetic(out, num_images=26, num_classes=4, size=SMALL, seed=3, workers=1,
                           progress=False)
    classes = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert classes == ["class_000", "class_001", "class_002", "class_003"]
    for k, name in enumerate(classes):
        files = sorted(os.listdir(out / name))
        expected = [f"img_{i:08d}.jpg" for i in range(26) if i % 4 == k]
        assert files == expected  # round-robin: image i has class i % C; no temp files left
    counts = [len(os.listdir(out / c)) for c in classes]
    assert counts == [7, 7, 6, 6]  # balanced (26 is not a multiple of 4)

    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == m
    assert m["complete"] is True
    assert m["classes"] == classes
    assert m["counts"] == dict(zip(classes, counts))
    assert m["num_images"] == 26 and m["num_classes"] == 4
    assert m["size"] == [96, 72] and m["seed"] == 3 and m["quality"] == 90
    assert m["total_bytes"] == sum(p.stat().st_size for p in out.rglob("*.jpg"))
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    with Image.open(out / "class_001" / "img_00000005.jpg") as im:
        assert im.format == "JPEG" and im.mode == "RGB" and im.size == SMALL


def test_render_image_contract():
    rng = np.random.default_rng(0)
    for size in [(96, 72), (40, 120), (8, 8)]:
        img = render_image(5, 7, rng, size)
        assert img.shape == (size[1], size[0], 3) and img.dtype == np.uint8
    a = render_image(2, 10, np.random.default_rng([0, 2]), SMALL)
    b = render_image(2, 10, np.random.default_rng([0, 2]), SMALL)
    assert np.array_equal(a, b)
    assert a.std() > 10  # not a flat image
    with pytest.raises(ValueError):
        render_image(10, 10, rng, SMALL)


def test_class_families_distinct_up_to_100_classes():
    fams = [class_family(k, 100) for k in range(100)]
    assert len({tuple(sorted(f.items())) for f in fams}) == 100
    # the first classes differ in shape *and* texture type
    assert len({f["shape"] for f in fams[:7]}) == 7
    assert len({f["texture"] for f in fams[:6]}) == 6


# ----------------------------------------------------------------------------- determinism
def test_deterministic_across_workers_and_seed_sensitive(tmp_path):
    kw = dict(num_images=12, num_classes=3, size=SMALL, progress=False)
    generate_synthetic(tmp_path / "a", seed=7, workers=1, **kw)
    generate_synthetic(tmp_path / "b", seed=7, workers=2, **kw)
    generate_synthetic(tmp_path / "c", seed=8, workers=1, **kw)
    a, b, c = (_files(tmp_path / x) for x in "abc")
    assert len(a) == 12
    assert a == b  # byte-identical whatever the number of workers
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a)  # another seed: every image differs


# ----------------------------------------------------------------------------- realism
def test_default_size_decodes_and_file_size_like_imagenet(tmp_path):
    m = generate_synthetic(tmp_path, num_images=20, num_classes=10, seed=0, workers=2, progress=False)
    assert m["size"] == [500, 375]
    paths = sorted(tmp_path.rglob("*.jpg"))
    assert len(paths) == 20
    for p in paths[:5]:
        with Image.open(p) as im:
            im.load()
            assert im.size == (500, 375) and im.mode == "RGB"
    mean_kb = sum(p.stat().st_size for p in paths) / len(paths) / 1024
    assert 40 <= mean_kb <= 160, mean_kb
    assert m["total_bytes"] / 20 / 1024 == pytest.approx(mean_kb)


# ----------------------------------------------------------------------------- cache / resume
def test_cache_does_not_rewrite(tmp_path):
    kw = dict(num_images=10, num_classes=2, size=SMALL, seed=1, workers=1, progress=False)
    m1 = generate_synthetic(tmp_path, **kw)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    m2 = generate_synthetic(tmp_path, **kw)
    after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    assert m2 == m1
    assert after == before  # nothing rewritten, manifest included


def test_changed_parameters_regenerate_and_remove_stale(tmp_path):
    kw = dict(size=SMALL, workers=1, progress=False)
    generate_synthetic(tmp_path, num_images=12, num_classes=4, seed=0, **kw)
    old = _files(tmp_path)
    m = generate_synthetic(tmp_path, num_images=6, num_classes=2, seed=0, **kw)
    new = _files(tmp_path)
    assert sorted(new) == sorted(str(Path(f"class_{i % 2:03d}") / f"img_{i:08d}.jpg") for i in range(6))
    assert not (tmp_path / "class_003").exists()
    assert m["num_images"] == 6 and sum(m["counts"].values()) == 6
    # image 2 moved from class 2 to class 0: re-rendered as a class-0 image
    assert new["class_000/img_00000002.jpg"] != old["class_002/img_00000002.jpg"]
    # image 4 is class 0 either way (a class's family does not depend on the number of classes)
    assert new["class_000/img_00000004.jpg"] == old["class_000/img_00000004.jpg"]


def test_interrupted_run_resumes_identically(tmp_path):
    kw = dict(num_images=8, num_classes=2, size=SMALL, seed=4, workers=1, progress=False)
    full = generate_synthetic(tmp_path / "full", **kw)
    generate_synthetic(tmp_path / "part", **kw)
    part = tmp_path / "part"
    # simulate a killed run: manifest still "in progress", some images missing
    man = json.loads((part / "manifest.json").read_text())
    man = {k: man[k] for k in ("format", "generator_version", "num_images", "num_classes", "size",
                               "seed", "quality")}
    (part / "manifest.json").write_text(json.dumps({**man, "complete": False}))
    (part / "class_001" / "img_00000003.jpg").unlink()
    kept = part / "class_000" / "img_00000000.jpg"
    mtime = kept.stat().st_mtime_ns
    m = generate_synthetic(part, **kw)
    assert kept.stat().st_mtime_ns == mtime  # finished images are kept
    assert _files(part) == _files(tmp_path / "full")
    assert m == full


# ----------------------------------------------------------------------------- errors
def test_out_dir_is_a_file(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(DataError, match="afile"):
        generate_synthetic(f, num_images=2, num_classes=2, size=SMALL, progress=False)
    with pytest.raises(DataError, match="afile"):
        generate_synthetic(f / "sub", num_images=2, num_classes=2, size=SMALL, progress=False)


def test_out_dir_not_writable_access_check(tmp_path, monkeypatch):
    """A folder the process may not write to (faked: CI runs as root, which ignores permission bits)."""
    real_access = os.access
    monkeypatch.setattr(synthetic.os, "access",
                        lambda p, mode, **kw: False if Path(p) == tmp_path / "ro" else real_access(p, mode))
    (tmp_path / "ro").mkdir()
    with pytest.raises(DataError, match="not writable"):
        generate_synthetic(tmp_path / "ro", num_images=2, num_classes=2, size=SMALL, progress=False)


def test_bad_parameters(tmp_path):
    with pytest.raises(DataError):
        generate_synthetic(tmp_path, num_images=0, num_classes=2, size=SMALL, progress=False)
    with pytest.raises(DataError):
        generate_synthetic(tmp_path, num_images=4, num_classes=1, size=SMALL, progress=False)


# ----------------------------------------------------------------------------- learnability proxy
_NR, _NA = 8, 6  # radial (half-octave, 1/32 .. 1/2 cycles/px) x orientation bins


def _spectrum_feature(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Colour-blind texture feature: pooled log power spectrum of a grayscale random crop
    covering 10-50% of the image (frequencies in cycles/pixel, so independent of crop size)."""
    g = img.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    h, w = g.shape
    area = rng.uniform(0.1, 0.5) * h * w
    ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    cw = int(min(w, round(np.sqrt(area * ratio))))
    ch = int(min(h, round(np.sqrt(area / ratio))))
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    crop = g[y:y + ch, x:x + cw]
    crop = (crop - crop.mean()) * np.outer(np.hanning(ch), np.hanning(cw))
    power = np.abs(np.fft.rfft2(crop)) ** 2
    fy = np.fft.fftfreq(ch)[:, None]
    fx = np.fft.rfftfreq(cw)[None, :]
    r = np.sqrt(fy ** 2 + fx ** 2)
    rbin = np.floor((np.log2(np.maximum(r, 1e-9)) + 5.0) / (4.0 / _NR)).astype(int)
    abin = np.minimum((np.mod(np.arctan2(fy, fx), np.pi) / np.pi * _NA).astype(int), _NA - 1)
    abin = np.broadcast_to(abin, r.shape)
    ok = (rbin >= 0) & (rbin < _NR)
    b = (rbin * _NA + abin)[ok]
    total = np.bincount(b, weights=power[ok], minlength=_NR * _NA)
    count = np.bincount(b, minlength=_NR * _NA)
    feat = np.log(total / np.maximum(count, 1) + 1e-3).reshape(_NR, _NA)
    # empty bins (small crops, low frequencies): the mean of their ring
    filled = (count > 0).reshape(_NR, _NA)
    ring = np.where(filled, feat, 0).sum(1, keepdims=True) / np.maximum(filled.sum(1, keepdims=True), 1)
    feat = np.where(filled, feat, ring).ravel()
    feat -= feat.mean()
    return feat / (np.linalg.norm(feat) + 1e-12)


def _mean_colour(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return img.reshape(-1, 3).mean(0) / 255.0


def _nearest_centroid_accuracy(feats: np.ndarray, labels: np.ndarray, train: np.ndarray) -> float:
    classes = np.unique(labels)
    cents = np.stack([feats[train & (labels == k)].mean(0) for k in classes])
    test = ~train
    d = ((feats[test][:, None, :] - cents[None]) ** 2).sum(-1)
    return float((classes[d.argmin(1)] == labels[test]).mean())


def _load(root: Path, m: dict) -> tuple[list[np.ndarray], np.ndarray]:
    imgs, labels = [], []
    for i in range(m["num_images"]):
        k = i % m["num_classes"]
        with Image.open(root / f"class_{k:03d}" / f"img_{i:08d}.jpg") as im:
            imgs.append(np.asarray(im.convert("RGB")))
        labels.append(k)
    return imgs, np.array(labels)


def _accuracies(imgs, labels, num_train: int) -> tuple[float, float]:
    train = np.arange(len(labels)) < num_train
    crop_rng = np.random.default_rng(123)
    spec = np.stack([_spectrum_feature(im, crop_rng) for im in imgs])
    col = np.stack([_mean_colour(im, crop_rng) for im in imgs])
    return (_nearest_centroid_accuracy(spec, labels, train),
            _nearest_centroid_accuracy(col, labels, train))


_C, _PER_CLASS, _TRAIN_PER_CLASS = 10, 30, 20
_LEARN_SIZE = (192, 144)


def test_classes_learnable_from_crops_but_not_from_colour(tmp_path):
    m = generate_synthetic(tmp_path, num_images=_C * _PER_CLASS, num_classes=_C, size=_LEARN_SIZE,
                           seed=11, workers=2, progress=False)
    imgs, labels = _load(tmp_path, m)
    spec_acc, col_acc = _accuracies(imgs, labels, _C * _TRAIN_PER_CLASS)
    chance = 1.0 / _C
    # texture/shape evidence survives grayscale and 10-50% crops ...
    assert spec_acc >= 4 * chance, (spec_acc, col_acc)
    # ... while colour is a nuisance variable, not a shortcut
    assert col_acc < 2 * chance, (spec_acc, col_acc)

    # The colour probe can fail: it catches a colour shortcut (a per-class colour cast, as a
    # dataset with colour-coded classes would have). The texture probe's negative control is
    # the next test.
    hues = np.linspace(0, 1, _C, endpoint=False)
    casts = synthetic._hsv_to_rgb(hues, np.full(_C, 0.8), np.full(_C, 0.9)) * 255
    tinted = [(0.5 * im + 0.5 * casts[k]).astype(np.uint8) for im, k in zip(imgs, labels)]
    assert _accuracies(tinted, labels, _C * _TRAIN_PER_CLASS)[1] >= 6 * chance


def test_learnability_probe_is_chance_without_class_families(tmp_path, monkeypatch):
    """Negative control: if every class used the same family, the texture probe must be ~chance."""
    fixed = class_family(0)
    monkeypatch.setattr(synthetic, "class_family", lambda k, n=None: dict(fixed))
    m = generate_synthetic(tmp_path, num_images=_C * _PER_CLASS, num_classes=_C, size=_LEARN_SIZE,
                           seed=11, workers=1, progress=False)
    imgs, labels = _load(tmp_path, m)
    spec_acc, _ = _accuracies(imgs, labels, _C * _TRAIN_PER_CLASS)
    assert spec_acc < 2 / _C, spec_acc


# ----------------------------------------------------------------------------- the shapes kind
def test_shapes_kind_classes_are_shapes_and_colour_is_no_shortcut(tmp_path):
    assert [synthetic.shape_class(k) for k in (0, 6, 7, 13)] == \
        [("disc", False), ("hexagon", False), ("disc", True), ("hexagon", True)]
    m = generate_synthetic(tmp_path / "a", num_images=_C * _PER_CLASS, num_classes=_C, size=_LEARN_SIZE,
                           seed=11, workers=1, progress=False, kind="shapes")
    assert m["kind"] == "shapes" and m["families"]["class_007"] == {"shape": "disc", "outlined": True}
    imgs, labels = _load(tmp_path / "a", m)
    # colour is random per image: the mean-colour probe is near chance
    assert _accuracies(imgs, labels, _C * _TRAIN_PER_CLASS)[1] < 2 / _C
    # deterministic, and another kind is another dataset (same folder: regenerated, not reused)
    again = generate_synthetic(tmp_path / "b", num_images=_C, num_classes=_C, size=_LEARN_SIZE, seed=11,
                               workers=1, progress=False, kind="shapes")
    for i in range(_C):
        name = f"class_{i:03d}/img_{i:08d}.jpg"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    photo = generate_synthetic(tmp_path / "b", num_images=_C, num_classes=_C, size=_LEARN_SIZE, seed=11,
                               workers=1, progress=False)
    assert photo["kind"] == "photo" and "texture" in photo["families"]["class_000"]
    assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "b" / name).read_bytes()


def test_manifest_without_kind_is_a_photo_cache(tmp_path):
    generate_synthetic(tmp_path, num_images=4, num_classes=2, size=SMALL, workers=1, progress=False)
    path = tmp_path / "manifest.json"
    old = json.loads(path.read_text())
    del old["kind"]  # as written before kinds existed
    path.write_text(json.dumps(old))
    before = (tmp_path / "class_000" / "img_00000000.jpg").stat().st_mtime_ns
    assert generate_synthetic(tmp_path, num_images=4, num_classes=2, size=SMALL, workers=1,
                              progress=False)["kind"] == "photo"
    assert (tmp_path / "class_000" / "img_00000000.jpg").stat().st_mtime_ns == before  # not redone


def test_shapes_kind_bad_parameters(tmp_path):
    with pytest.raises(DataError, match="14 classes at most"):
        generate_synthetic(tmp_path, num_images=15, num_classes=15, size=SMALL, progress=False, kind="shapes")
    with pytest.raises(DataError, match="kinds: photo, shapes"):
        generate_synthetic(tmp_path, num_images=4, num_classes=2, size=SMALL, progress=False, kind="noise")


# ----------------------------------------------------------------------------- CLI
def test_cli_synth(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = cli.main(["synth", "--out", str(out), "--images", "20", "--classes", "4", "--size", "64x48",
                   "--no-progress", "--workers", "1"])
    assert rc == 0
    files = sorted(out.rglob("*.jpg"))
    assert len(files) == 20
    with Image.open(files[0]) as im:
        assert im.size == (64, 48)
    line = capsys.readouterr().out.strip()
    assert "20 images" in line and "4 classes" in line and "KB" in line
    assert json.loads((out / "manifest.json").read_text())["size"] == [64, 48]
    assert cli.main(["synth", "--out", str(tmp_path / "shapes"), "--images", "4", "--classes", "2",
                     "--size", "64x48", "--no-progress", "--workers", "1", "--kind", "shapes"]) == 0
    assert json.loads((tmp_path / "shapes" / "manifest.json").read_text())["kind"] == "shapes"


@pytest.mark.parametrize("size", ["64", "64x", "axb", "0x10", "64x48x3"])
def test_cli_bad_size(tmp_path, size, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["synth", "--out", str(tmp_path / "x"), "--size", size, "--no-progress"])
    assert exc.value.code != 0
    assert "--size" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cli_unwritable_out(tmp_path, capsys):
    blocker = tmp_path / "regular_file"
    blocker.write_text("not a directory")
    target = blocker / "ds"
    rc = cli.main(["synth", "--out", str(target), "--images", "2", "--classes", "2", "--size", "16x16",
                   "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "error" in err and str(target) in err
    assert "Traceback" not in err
