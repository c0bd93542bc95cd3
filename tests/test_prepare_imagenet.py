"""swav-fast prepare from the ImageNet archives (built here, tiny, in the official layout): the train tar of
per-synset tars, the flat validation tar / folder with each label-file format, class and per-class
subsets, damaged archives, kill + resume, and kNN / linear evaluation reading the prepared shards."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from swav_fast.cli import main
from swav_fast.errors import DataError
from swav_fast.prepare import prepare_dataset, read_manifest
from swav_fast.prepare.imagenet import BUILTIN_CLASSES, read_class_list, read_labels
from tests.test_prepare import read_samples, run_until_pause, tree_bytes

REPO = Path(__file__).resolve().parents[1]
#: Sorted: n01749939 and n02869837 are in ImageNet-100, the others are not.
SYNSETS = ["n01440764", "n01749939", "n02869837", "n15075141"]
#: The "devkit" order of the ILSVRC2012 IDs (ID k = DEVKIT[k - 1]): deliberately not sorted.
DEVKIT = ["n15075141", "n02869837", "n01440764", "n01749939"]
#: Validation image k (1-based) -> synset; every class appears.
VAL = ["n02869837", "n01440764", "n15075141", "n01749939", "n01440764", "n02869837", "n15075141", "n01749939",
       "n02869837"]
FORMATS = ("tfrecord", "wds", "beton")
#: Files that are not plain RGB JPEGs (as ImageNet has a few): converted, and reported.
ODD = {"n01440764/n01440764_7.JPEG": "CMYK JPEG converted to RGB",
       "n01749939/n01749939_3.JPEG": "PNG data converted to JPEG",
       "n02869837/n02869837_11.JPEG": "L JPEG converted to RGB"}
HAS_SCIPY = True
try:
    import scipy.io  # noqa: F401
except ImportError:
    HAS_SCIPY = False


def _image(rng: np.random.Generator, w: int = 40, h: int = 32) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    img = rng.uniform(40, 200, 3) + 50 * np.sin(x[..., None] / rng.uniform(3, 8) + rng.uniform(0, 6, 3))
    img = img + 30 * np.cos(y[..., None] / 5.0)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _encode(im: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, quality=90) if fmt == "JPEG" else im.save(buf, fmt)
    return buf.getvalue()


def _tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_300_000_000
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _write_meta_mat(path: Path, devkit: list[str]) -> None:
    """A meta.mat laid out as the devkit's: struct array ``synsets`` (leaves first, then an inner node)."""
    import scipy.io  # noqa: F811

    dt = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
    rows = [(k + 1, w, f"class {w}", 0) for k, w in enumerate(devkit)]
    rows.append((len(devkit) + 1, "n00001740", "entity", 4))
    scipy.io.savemat(path, {"synsets": np.array(rows, dtype=dt)})


@pytest.fixture(scope="module")
def imnet(tmp_path_factory) -> dict[str, Path]:
    """Train tar (inner tars and their members out of order), extracted train folder, val tar / flat
    folder / class-folder copy, and the label files."""
    root = tmp_path_factory.mktemp("imnet")
    rng = np.random.default_rng(3)
    train_dir = root / "train"
    inner: dict[str, list[tuple[str, bytes]]] = {}
    for s in SYNSETS:
        (train_dir / s).mkdir(parents=True)
        files = []
        for k in (11, 3, 7, 20, 5):  # tar order is not sorted order
            name = f"{s}_{k}.JPEG"
            rel = f"{s}/{name}"
            im = _image(rng)
            if ODD.get(rel, "").startswith("CMYK"):
                data = _encode(im.convert("CMYK"))
            elif ODD.get(rel, "").startswith("PNG"):
                data = _encode(im, "PNG")
            elif ODD.get(rel, "").startswith("L "):
                data = _encode(im.convert("L"))
            else:
                data = _encode(im)
            (train_dir / rel).write_bytes(data)
            files.append((name, data))
        inner[s] = files
    paths = {"train_dir": train_dir, "train_tar": root / "ILSVRC2012_img_train.tar"}
    paths["train_tar"].write_bytes(
        _tar_bytes([(f"{s}.tar", _tar_bytes(inner[s])) for s in reversed(SYNSETS)])
    )
    val_flat, val_cls = root / "val_flat", root / "val_classes"
    val_flat.mkdir()
    members = []
    for k, s in enumerate(VAL, start=1):
        name = f"ILSVRC2012_val_{k:08d}.JPEG"
        data = _encode(_image(rng, 36, 44))
        (val_flat / name).write_bytes(data)
        (val_cls / s).mkdir(parents=True, exist_ok=True)
        (val_cls / s / name).write_bytes(data)
        members.append((name, data))
    paths.update(val_flat=val_flat, val_classes=val_cls, val_tar=root / "ILSVRC2012_img_val.tar")
    paths["val_tar"].write_bytes(_tar_bytes(list(reversed(members))))
    gt = "".join(f"{DEVKIT.index(s) + 1}\n" for s in VAL)
    labels = root / "labels"
    (labels / "txt").mkdir(parents=True)
    paths["gt"] = labels / "txt" / "ILSVRC2012_validation_ground_truth.txt"
    paths["gt"].write_text(gt)
    paths["synsets"] = labels / "synsets.txt"
    paths["synsets"].write_text("".join(s + "\n" for s in DEVKIT))
    order = [4, 0, 8, 2, 6, 1, 3, 7, 5]  # the CSV is not in image order either
    paths["csv"] = labels / "LOC_val_solution.csv"
    paths["csv"].write_text("ImageId,PredictionString\n" + "".join(
        f"ILSVRC2012_val_{k + 1:08d},{VAL[k]} 1 2 30 40 {VAL[k]} 5 6 20 20 \n" for k in order))
    if HAS_SCIPY:
        devkit = labels / "ILSVRC2012_devkit_t12" / "data"
        devkit.mkdir(parents=True)
        (devkit / "ILSVRC2012_validation_ground_truth.txt").write_text(gt)
        _write_meta_mat(devkit / "meta.mat", DEVKIT)
        paths["devkit_dir"] = devkit.parent
        paths["devkit_tgz"] = labels / "ILSVRC2012_devkit_t12.tar.gz"
        with tarfile.open(paths["devkit_tgz"], "w:gz") as tf:
            tf.add(devkit.parent, arcname="ILSVRC2012_devkit_t12")
    return paths


def shard_files(split: Path) -> dict[str, bytes]:
    """Every file of a prepared split except the manifest (which names its source)."""
    return {k: v for k, v in tree_bytes(split).items() if k != "manifest.json"}


def stored_labels(split: Path) -> list[int]:
    """Labels in source order (the beton stores samples in source order, the others by source index)."""
    m = read_manifest(split)
    if m["format"] == "beton":
        from pipelines.formats.beton import read_beton_tables

        return [int(v) for v in read_beton_tables(split / m["shards"][0]["path"])[2]["f1"]]
    samples = read_samples(split)
    return [samples[i][0] for i in sorted(samples)]


def same_dataset(a: dict, b: dict) -> None:
    keys = ("format", "num_samples", "num_source_files", "classes", "counts_per_class", "shards", "bad_files",
            "converted_files", "num_passthrough", "source_fingerprint", "params")
    assert {k: a[k] for k in keys} == {k: b[k] for k in keys}


# ----------------------------------------------------------------------------- train tar
@pytest.mark.parametrize("fmt,workers", [("tfrecord", 1), ("wds", 2), ("beton", 1)])
def test_train_tar_gives_the_extracted_folder_bytes(imnet, tmp_path: Path, fmt: str, workers: int) -> None:
    opts = dict(shard_size=6, workers=workers, progress=False)
    m = prepare_dataset(imnet["train_tar"], tmp_path / "tar", fmt, **opts)
    ref = prepare_dataset(imnet["train_dir"], tmp_path / "dir", fmt, **opts)
    assert m["source_kind"] == "train-tar" and ref["source_kind"] == "imagefolder"
    assert m["classes"] == SYNSETS and m["num_samples"] == 20 and m["bad_files"] == []
    same_dataset(m, ref)
    assert shard_files(tmp_path / "tar" / "train") == shard_files(tmp_path / "dir" / "train")
    assert {c["path"]: c["reason"] for c in m["converted_files"]} == ODD
    assert stored_labels(tmp_path / "tar" / "train") == [k for k, s in enumerate(SYNSETS) for _ in range(5)]


def test_progress_bar_shows_rate_and_time_left(imnet, tmp_path: Path, capsys) -> None:
    prepare_dataset(imnet["train_tar"], tmp_path, "wds", shard_size=50, workers=1, progress=True)
    err = capsys.readouterr().err
    assert "index ILSVRC2012_img_train.tar" in err and "tar/s" in err
    last = err.replace("\r", "\n").strip().splitlines()[-1]
    assert "20/20 img" in last and "img/s" in last and "<00:00" in last, last


# ----------------------------------------------------------------------------- validation
def label_options(imnet) -> dict[str, dict]:
    out = {"devkit txt + --synsets": dict(labels=imnet["gt"], synsets=imnet["synsets"]),
           "LOC_val_solution.csv": dict(labels=imnet["csv"])}
    if HAS_SCIPY:
        out["devkit folder (meta.mat)"] = dict(labels=imnet["devkit_dir"])
        out["devkit .tar.gz (meta.mat)"] = dict(labels=imnet["devkit_tgz"])
        out["devkit txt + meta.mat beside it"] = dict(labels=imnet["devkit_dir"] / "data" /
                                                      "ILSVRC2012_validation_ground_truth.txt")
    return out


def test_val_tar_and_folder_with_every_label_format_match_the_class_folders(imnet, tmp_path: Path) -> None:
    opts0 = dict(split="val", shard_size=4, workers=1, progress=False)
    refs = {fmt: prepare_dataset(imnet["val_classes"], tmp_path / f"ref-{fmt}", fmt, **opts0)
            for fmt in FORMATS}
    runs = 0
    for n, (what, opts) in enumerate(label_options(imnet).items()):
        for src in ("val_tar", "val_flat"):
            fmt = FORMATS[(2 * n + (src == "val_flat")) % 3]
            out = tmp_path / f"{n}-{src}"
            m = prepare_dataset(imnet[src], out, fmt, **opts0, **opts)
            assert m["source_kind"] == ("val-tar" if src == "val_tar" else "val-folder")
            assert m["labels"]["format"] == ("loc-csv" if what.startswith("LOC") else "devkit"), what
            same_dataset(m, refs[fmt])
            assert shard_files(out / "val") == shard_files(tmp_path / f"ref-{fmt}" / "val"), (what, src)
            runs += 1
    assert runs == (10 if HAS_SCIPY else 4)
    samples = read_samples(tmp_path / "ref-tfrecord" / "val")
    order = sorted(range(len(VAL)), key=lambda k: (VAL[k], k))  # class folders: sorted by synset, then name
    assert [samples[i][0] for i in range(len(VAL))] == [SYNSETS.index(VAL[k]) for k in order]


def test_meta_mat_without_scipy_names_what_is_missing(imnet, tmp_path: Path, monkeypatch) -> None:
    """Where scipy is installed the meta.mat path is tested above (written by scipy.io.savemat);
    without scipy the error must say what to install or pass instead."""
    if HAS_SCIPY:
        monkeypatch.setitem(sys.modules, "scipy", None)
        monkeypatch.setitem(sys.modules, "scipy.io", None)
        labels = imnet["devkit_dir"]
    else:
        labels = tmp_path
        (labels / imnet["gt"].name).write_bytes(imnet["gt"].read_bytes())
        (labels / "meta.mat").write_bytes(b"MATLAB 5.0 MAT-file")
    with pytest.raises(DataError, match=r"needs scipy \(pip install scipy\); or pass --synsets FILE"):
        read_labels(labels)


def cli(*args: str) -> int:
    return main(["prepare", *map(str, args), "--no-progress", "--workers", "1"])


def test_label_problems_are_one_line_errors_before_any_work(imnet, tmp_path: Path, capsys) -> None:
    gt = imnet["gt"].read_text().splitlines()
    bad = tmp_path / "bad"
    bad.mkdir()
    cases = {
        "short.txt": ("\n".join(gt[:-1]) + "\n", "no label for 1 of the 9 images", "ILSVRC2012_val_00000009"),
        "long.txt": ("\n".join(gt + ["2"]) + "\n", "1 label(s) for images that", "ILSVRC2012_val_00000010"),
        "range.txt": ("\n".join(gt[:3] + ["5"] + gt[4:]) + "\n", "line 4: ID 5 has no synset", "1..4"),
        "word.txt": ("\n".join(gt[:2] + ["n01440764"] + gt[3:]) + "\n", "line 3", "not an ILSVRC2012 ID"),
    }
    csv_lines = imnet["csv"].read_text().splitlines()
    cases["short.csv"] = ("\n".join(ln for ln in csv_lines if "val_00000004" not in ln) + "\n", "no label for 1",
                          "ILSVRC2012_val_00000004")
    cases["long.csv"] = ("\n".join(csv_lines + ["ILSVRC2012_val_00000042,n01440764 1 2 3 4"]) + "\n",
                         "1 label(s) for images", "ILSVRC2012_val_00000042")
    cases["header.csv"] = ("\n".join(csv_lines[1:]) + "\n", "expected the header", "ImageId,PredictionString")
    for name, (text, *expect) in cases.items():
        (bad / name).write_text(text)
        for src in ("val_tar", "val_flat"):
            extra = ["--synsets", imnet["synsets"]] if name.endswith(".txt") else []
            code = cli("--src", imnet[src], "--labels", bad / name, *extra, "--split", "val",
                       "--format", "wds", "--out", tmp_path / "out")
            err = capsys.readouterr().err.strip()
            assert code == 2 and len(err.splitlines()) == 1, (name, err)
            assert str(bad / name) in err and all(e in err for e in expect), (name, err)
    assert not (tmp_path / "out").exists()  # nothing was started
    for args, expect in (
        (["--labels", imnet["gt"]], "--synsets FILE"),  # IDs without meta.mat or a synset list
        ([], "pass --labels"),  # a flat archive without labels
    ):
        assert cli("--src", imnet["val_tar"], *args, "--format", "wds", "--out", tmp_path / "o") == 2
        assert expect in capsys.readouterr().err
    code = cli("--src", imnet["train_tar"], "--labels", imnet["csv"], "--format", "wds",
               "--out", tmp_path / "o")
    assert code == 2
    assert "--labels is for a flat validation source" in capsys.readouterr().err


# ----------------------------------------------------------------------------- subsets
def test_builtin_imagenet100_list(tmp_path: Path) -> None:
    names = read_class_list("imagenet100")
    assert len(names) == len(set(names)) == 100 and set(BUILTIN_CLASSES) == {"imagenet100"}
    assert all(len(n) == 9 and n[0] == "n" and n[1:].isdigit() for n in names)
    assert names[:3] == ["n02869837", "n01749939", "n02488291"] and names[-1] == "n02090622"
    # a train tar with those 100 classes and 2 others, 2 images each: --classes imagenet100 --per-class 1
    rng = np.random.default_rng(0)
    tiny = [_encode(_image(rng, 8, 8)) for _ in range(4)]
    others = ["n01440764", "n15075141"]
    archive = tmp_path / "train.tar"
    inner = [_tar_bytes([(f"{s}_{k}.JPEG", tiny[(i + k) % 4]) for k in (2, 1)])
             for i, s in enumerate(names + others)]
    archive.write_bytes(_tar_bytes([(f"{s}.tar", t) for s, t in zip(names + others, inner)]))
    m = prepare_dataset(archive, tmp_path / "out", "tfrecord", classes="imagenet100", per_class=1,
                        shard_size=64, workers=1, progress=False)
    assert m["classes"] == sorted(names) and m["num_samples"] == 100
    assert m["subset"]["classes"] == "imagenet100" and m["subset"]["per_class"] == 1
    got = read_samples(tmp_path / "out" / "train")
    by_class = {s: tiny[(i + 1) % 4] for i, s in enumerate(names)}  # the first by file name: <s>_1.JPEG
    assert [(lab, data) for lab, data in (got[i] for i in range(100))] == [
        (k, by_class[s]) for k, s in enumerate(sorted(names))]


def test_classes_and_per_class_choose_exactly_that(imnet, tmp_path: Path) -> None:
    sub = tmp_path / "in100"
    want = ["n01749939", "n02869837"]
    (tmp_path / "want.txt").write_text("n02869837\nn01749939\n")
    for name in want:  # the extracted equivalent: those class folders, the first 2 files by name
        (sub / name).mkdir(parents=True)
        for p in sorted((imnet["train_dir"] / name).iterdir())[:2]:
            (sub / name / p.name).write_bytes(p.read_bytes())
    m = prepare_dataset(imnet["train_tar"], tmp_path / "a", "wds", classes=str(tmp_path / "want.txt"),
                        per_class=2, workers=1, progress=False)
    prepare_dataset(sub, tmp_path / "b", "wds", workers=1, progress=False)
    assert m["classes"] == want and m["counts_per_class"] == {c: 2 for c in want}
    assert m["subset"] == {"num_classes": 2, "per_class": 2, "classes": str(tmp_path / "want.txt"),
                           "classes_sha256": m["subset"]["classes_sha256"], "rule": m["subset"]["rule"]}
    assert m["params"]["classes"] == str(tmp_path / "want.txt") and m["params"]["per_class"] == 2
    assert shard_files(tmp_path / "a" / "train") == shard_files(tmp_path / "b" / "train")
    # a class file on the validation tar: the kept classes are indexed in sorted order
    (tmp_path / "two.txt").write_text("# comment\nn15075141\n\nn01440764\n")
    v = prepare_dataset(imnet["val_tar"], tmp_path / "v", "tfrecord", split="val", labels=imnet["csv"],
                        classes=str(tmp_path / "two.txt"), workers=1, progress=False)
    assert v["classes"] == ["n01440764", "n15075141"] and v["num_samples"] == 4
    assert v["subset"]["classes"] == str(tmp_path / "two.txt") and v["subset"]["per_class"] is None
    assert sorted(lab for lab, _ in read_samples(tmp_path / "v" / "val").values()) == [0, 0, 1, 1]
    (tmp_path / "unknown.txt").write_text("n01440764\nn09999999\n")
    with pytest.raises(DataError, match=r"unknown.txt: 1 of its 2 classes are not in .*n09999999"):
        prepare_dataset(imnet["train_tar"], tmp_path / "u", "wds", classes=str(tmp_path / "unknown.txt"))
    with pytest.raises(DataError, match="no such file"):
        prepare_dataset(imnet["train_tar"], tmp_path / "u", "wds", classes="imagenet1001")


# ----------------------------------------------------------------------------- damaged archives
def test_corrupt_inner_tar_is_a_reported_skip_without_wrong_labels(imnet, tmp_path: Path) -> None:
    data = bytearray(imnet["train_tar"].read_bytes())
    with tarfile.open(imnet["train_tar"]) as tf:
        m = tf.getmember("n01749939.tar")
        inner = tarfile.open(fileobj=tf.extractfile(m))
        second = inner.getmembers()[1]
    head = m.offset_data + second.offset  # garble the second image's header inside the inner tar
    data[head:head + 100] = b"\x7f" * 100
    broken = tmp_path / "broken.tar"
    broken.write_bytes(bytes(data))
    got = prepare_dataset(broken, tmp_path / "out", "tfrecord", workers=1, progress=False)
    assert got["classes"] == SYNSETS
    (bad,) = got["bad_files"]
    assert bad["path"] == "n01749939.tar" and bad["reason"].startswith("corrupt inner tar"), bad
    assert got["counts_per_class"] == {"n01440764": 5, "n01749939": 1, "n02869837": 5, "n15075141": 5}
    ref = {}
    for s in SYNSETS:
        for p in (imnet["train_dir"] / s).iterdir():
            ref[p.read_bytes()] = SYNSETS.index(s)
    samples = read_samples(tmp_path / "out" / "train").values()
    converted = {c["path"] for c in got["converted_files"]}
    assert len(samples) == 16 and len(converted) == 2
    for label, jpeg in samples:  # every stored image carries the label of its inner tar
        if jpeg in ref:
            assert ref[jpeg] == label
    assert sum(jpeg in ref for _, jpeg in samples) == 16 - len(converted)


def test_truncated_outer_tar_is_a_clear_error(imnet, tmp_path: Path, capsys) -> None:
    data = imnet["train_tar"].read_bytes()
    with tarfile.open(imnet["train_tar"]) as tf:
        last = max(tf.getmembers(), key=lambda m: m.offset)
    end_of_members = last.offset_data + -(-last.size // 512) * 512
    # inside the last inner tar, inside a header, right after the last member (no end-of-archive block)
    for cut in (last.offset_data + 700, last.offset + 100, end_of_members):
        trunc = tmp_path / f"cut{cut}.tar"
        trunc.write_bytes(data[:cut])
        assert cli("--src", trunc, "--format", "wds", "--out", tmp_path / "o") == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(trunc) in err and "damaged or incomplete" in err, err
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- kill + resume
@pytest.mark.parametrize("fmt,workers", [("wds", 2), ("beton", 1)])
def test_killed_tar_run_resumes_to_identical_output(imnet, tmp_path: Path, fmt: str, workers: int) -> None:
    opts = dict(shard_size=4, workers=workers, progress=False)
    prepare_dataset(imnet["train_tar"], tmp_path / "ref", fmt, **opts)
    run_until_pause(["--src", str(imnet["train_tar"]), "--format", fmt, "--out", str(tmp_path / "run"),
                     "--shard-size", "4", "--workers", str(workers)], after_shards=2)
    names = set(os.listdir(tmp_path / "run" / "train"))
    assert "manifest.json" not in names and any(n.endswith(".tmp") for n in names)
    m = prepare_dataset(imnet["train_tar"], tmp_path / "run", fmt, **opts)
    ref = read_manifest(tmp_path / "ref" / "train")
    assert m == ref
    assert tree_bytes(tmp_path / "run") == tree_bytes(tmp_path / "ref")


# ----------------------------------------------------------------------------- evaluation on shards
class _TinyTrunk(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).relu().mean(dim=(2, 3))


def test_knn_and_linear_read_prepared_shards(imnet, tmp_path: Path) -> None:
    from swav_fast.eval.knn import extract_features, knn_eval
    from swav_fast.eval.linear import linear_probe

    trunk = _TinyTrunk().eval()
    folders = tmp_path / "folders"
    folders.mkdir()
    (folders / "train").symlink_to(imnet["train_dir"])
    (folders / "val").symlink_to(imnet["val_classes"])
    ref_f, ref_y = extract_features(trunk, imnet["val_classes"], image_size=32)
    ref = knn_eval(trunk, folders, image_size=32, k=3)
    for fmt in FORMATS:
        data = tmp_path / fmt
        prepare_dataset(imnet["val_tar"], data, fmt, split="val", labels=imnet["csv"], workers=1,
                        progress=False)
        f, y = extract_features(trunk, data / "val", image_size=32)
        assert torch.equal(y, ref_y) and torch.equal(f, ref_f), fmt  # same images, same order, same labels
        (data / "train").symlink_to(imnet["train_dir"])  # the bank stays an ImageFolder
        assert knn_eval(trunk, data, image_size=32, k=3).as_dict() == ref.as_dict()
    prepare_dataset(imnet["train_tar"], tmp_path / "wds2", "wds", workers=1, progress=False)
    (tmp_path / "wds2" / "val").symlink_to(tmp_path / "beton" / "val")
    lin = linear_probe(trunk, tmp_path / "wds2", image_size=32, epochs=2, cache_dir=tmp_path / "cache")
    assert (lin.num_train, lin.num_val, lin.num_classes) == (20, 9, 4) and not lin.features_cached
    again = linear_probe(trunk, tmp_path / "wds2", image_size=32, epochs=2, cache_dir=tmp_path / "cache")
    assert again.features_cached and again.top1 == lin.top1
    # the CLI help says what --data may hold
    out = subprocess.run([sys.executable, "-m", "swav_fast", "eval", "knn", "--help"], cwd=REPO,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert "prepared" in out.stdout


def test_bench_prepare_tar_source_mode(tmp_path: Path, monkeypatch) -> None:
    from benchmarks.bench_prepare import main as bench

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert bench(["--tar-source", "--images", "24", "--classes", "3", "--size", "40x32", "--workers", "1,2,0",
                  "--formats", "wds", "--json", str(tmp_path / "r.json")]) == 0
    import json

    rows = json.loads((tmp_path / "r.json").read_text())["prepare_tar"]
    assert [r["workers"] for r in rows] == [1, 2, 0] and all(r["images"] == 24 for r in rows)
    assert all(r["images_per_s"] > 0 and r["source"] == "train-tar" for r in rows)
