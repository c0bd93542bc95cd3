"""swav-fast prepare: round trips per format, re-encoding, bad files, manifest, interruption, DALI readers."""

from __future__ import annotations

import io
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from swav_fast.errors import DataError
from swav_fast.prepare import prepare_dataset, read_manifest, shard_paths
from pipelines.formats.beton import read_beton_tables
from swav_fast.prepare.core import PAUSE_ENV, PAUSE_MESSAGE
from pipelines.formats.manifest import sha256_file
from pipelines.formats.tfrecord import (
    _crc32c_python,
    crc32c,
    decode_example,
    encode_example,
    iter_tfrecord_offsets,
    read_tfrecord_payload,
)
from tests.helpers import write_image_folder

REPO = Path(__file__).resolve().parents[1]
FORMATS = ("tfrecord", "wds", "beton")
#: Files that cannot be passed through and must be converted to RGB JPEG.
CONVERTED = {"class_0/cmyk.jpg", "class_1/gray.jpg", "class_2/disguised.jpg", "class_2/rotated.jpg"}


def _jpeg(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=kw.pop("quality", 90), **kw)
    return buf.getvalue()


def _smooth(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    img = (
        rng.uniform(40, 200, 3)
        + 50 * np.sin(x[..., None] / 7.0 + rng.uniform(0, 6, 3))
        + 30 * np.cos(y[..., None] / 5.0 + rng.uniform(0, 6, 3))
    )
    return np.clip(img, 0, 255).astype(np.uint8)


def make_source(root: Path, per_class: int = 4) -> Path:
    """3 classes of small RGB JPEGs plus the ImageNet oddities (CMYK, gray, PNG named .jpg, ...)."""
    write_image_folder(root, classes=3, per_class=per_class, size=(64, 48))
    rng = np.random.default_rng(7)
    Image.fromarray(_smooth(rng, 64, 48)).convert("CMYK").save(root / "class_0/cmyk.jpg", "JPEG", quality=92)
    (root / "class_0/progressive.jpg").write_bytes(_jpeg(_smooth(rng, 56, 40), progressive=True))
    Image.fromarray(_smooth(rng, 48, 64)).convert("L").save(root / "class_1/gray.jpg", "JPEG", quality=92)
    (root / "class_1/big.jpg").write_bytes(_jpeg(_smooth(rng, 200, 120)))
    Image.fromarray(_smooth(rng, 40, 40)).save(root / "class_2/disguised.jpg", "PNG")
    exif = Image.Exif()
    exif[0x0112] = 6
    (root / "class_2/rotated.jpg").write_bytes(_jpeg(_smooth(rng, 64, 48), exif=exif.tobytes()))
    (root / "class_2/notes.txt").write_text("not an image extension: ignored by the scan")
    return root


def add_bad_files(root: Path) -> dict[str, str]:
    """One bad file of each kind; returns {relative path: expected reason prefix}."""
    good = (root / "class_0/img_0.jpg").read_bytes()
    (root / "class_0/empty.jpg").write_bytes(b"")
    (root / "class_1/truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "class_2/text.jpg").write_text("this is not an image at all\n" * 20)
    (root / "class_2/unreadable.jpg").write_bytes(good)
    return {
        "class_0/empty.jpg": "empty file",
        "class_1/truncated.jpg": "truncated",
        "class_2/text.jpg": "not an image",
        "class_2/unreadable.jpg": "unreadable",
    }


def sorted_sources(root: Path) -> list[tuple[str, int]]:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    return [
        (f"{c}/{p.name}", k)
        for k, c in enumerate(classes)
        for p in sorted((root / c).iterdir(), key=lambda p: p.name)
        if p.suffix == ".jpg"
    ]


def read_samples(split_dir: Path) -> dict[int, tuple[int, bytes]]:
    """{source index: (label, jpeg bytes)} read back with independent readers (tarfile, ffcv-free beton)."""
    m = read_manifest(split_dir)
    out: dict[int, tuple[int, bytes]] = {}
    if m["format"] == "beton":
        ((path, _),) = shard_paths(split_dir, m)
        _, _, meta, alloc = read_beton_tables(path)
        data = Path(path).read_bytes()
        sizes = dict(zip(alloc["ptr"].tolist(), alloc["size"].tolist()))
        # the beton has no source index: samples are stored in source order, bad files skipped
        good = [
            i
            for i, (p, _) in enumerate(sorted_sources(Path(m["source"])))
            if p not in {b["path"] for b in m["bad_files"]}
        ]
        for row, i in zip(meta, good):
            ptr = int(row["f0"]["data_ptr"])
            out[i] = (int(row["f1"]), data[ptr:ptr + sizes[ptr]])
        return out
    for shard, _ in shard_paths(split_dir, m):
        if m["format"] == "tfrecord":
            with open(shard, "rb") as f:
                for off, n in iter_tfrecord_offsets(f, os.path.getsize(shard), check_crc=True):
                    ex = decode_example(read_tfrecord_payload(f, off, n))
                    i = ex["image/index"][0]
                    assert i not in out
                    out[i] = (ex["image/class/label"][0], ex["image/encoded"][0])
        else:
            with tarfile.open(shard) as tar:
                members = {t.name: tar.extractfile(t).read() for t in tar.getmembers()}
            for name, data in members.items():
                if name.endswith(".jpg"):
                    key = name[:-4]
                    assert key.isdigit() and len(key) == m["key_digits"]
                    out[int(key)] = (int(members[key + ".cls"].decode("ascii")), data)
    return out


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "JPEG" and im.mode == "RGB"
        return np.asarray(im, dtype=np.float64)


def reference_rgb(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """The image as displayed (EXIF orientation applied), RGB, optionally resized."""
    with Image.open(path) as im:
        rgb = ImageOps.exif_transpose(im).convert("RGB")
        if size is not None:
            rgb = rgb.resize(size, Image.Resampling.LANCZOS)
        return np.asarray(rgb, dtype=np.float64)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0**2 / max(np.mean((a - b) ** 2), 1e-12)))


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return make_source(tmp_path_factory.mktemp("src") / "data")


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_passthrough(source: Path, tmp_path: Path, fmt: str) -> None:
    m = prepare_dataset(source, tmp_path / "out", fmt, shard_size=5, workers=1, progress=False)
    src = sorted_sources(source)
    assert m["format"] == fmt and m["num_samples"] == m["num_source_files"] == len(src) == 18
    assert m["classes"] == ["class_0", "class_1", "class_2"] and m["class_to_idx"] == {
        "class_0": 0,
        "class_1": 1,
        "class_2": 2,
    }
    assert m["counts_per_class"] == {"class_0": 6, "class_1": 6, "class_2": 6} and m["bad_files"] == []
    assert (m["num_passthrough"], m["num_reencoded"]) == (14, 4)
    assert read_manifest(tmp_path / "out" / "train") == m
    for s, (shard, index) in zip(m["shards"], shard_paths(tmp_path / "out" / "train", m)):
        assert os.path.getsize(shard) == s["bytes"] and sha256_file(shard) == s["sha256"]
        assert (index is None) == (fmt == "beton")
    assert [s["num_samples"] for s in m["shards"]] == ([18] if fmt == "beton" else [5, 5, 5, 3])
    samples = read_samples(tmp_path / "out" / "train")
    assert sorted(samples) == list(range(len(src)))  # every image exactly once
    for i, (rel, label) in enumerate(src):
        got_label, data = samples[i]
        assert got_label == label, rel
        pixels = decode(data)
        if rel in CONVERTED:  # re-encoded at quality 90: close, not equal
            ref = reference_rgb(source / rel)
            assert pixels.shape == ref.shape and psnr(pixels, ref) > 30, rel
        else:  # passed through: the very same bytes, hence the same pixels
            assert data == (source / rel).read_bytes(), rel


def test_rotated_jpeg_is_stored_as_displayed(source: Path, tmp_path: Path) -> None:
    """EXIF-rotated files are re-encoded turned and without the tag (as every loader reads a folder)."""
    prepare_dataset(source, tmp_path / "o", "tfrecord", workers=1, progress=False)
    samples = read_samples(tmp_path / "o" / "train")
    i = [p for p, _ in sorted_sources(source)].index("class_2/rotated.jpg")
    with Image.open(io.BytesIO(samples[i][1])) as im:
        assert im.size == (48, 64) and im.getexif().get(0x0112) is None


@pytest.mark.parametrize("fmt", FORMATS)
def test_reencode_with_max_resolution(source: Path, tmp_path: Path, fmt: str) -> None:
    m = prepare_dataset(
        source, tmp_path / "out", fmt, shard_size=7, max_resolution=50, quality=85, workers=2, progress=False
    )
    assert m["num_passthrough"] == 0 and m["num_reencoded"] == 18
    assert m["params"]["max_resolution"] == 50 and m["params"]["quality"] == 85
    samples = read_samples(tmp_path / "out" / "train")
    for i, (rel, label) in enumerate(sorted_sources(source)):
        with Image.open(source / rel) as im:
            w, h = ImageOps.exif_transpose(im).size
        scale = min(1.0, 50 / max(w, h))
        size = (round(w * scale), round(h * scale))
        pixels = decode(samples[i][1])
        assert samples[i][0] == label
        assert pixels.shape[:2] == (size[1], size[0]) and max(size) <= 50, rel
        assert psnr(pixels, reference_rgb(source / rel, size if scale < 1 else None)) > 28, rel
    if fmt == "beton":
        _, _, meta, _ = read_beton_tables(tmp_path / "out" / "train" / "train.beton")
        assert int(meta["f0"]["width"].max()) <= 50 and int(meta["f0"]["height"].max()) <= 50


def test_output_independent_of_worker_count(source: Path, tmp_path: Path) -> None:
    for fmt in ("wds", "beton"):
        a = prepare_dataset(source, tmp_path / f"a{fmt}", fmt, shard_size=4, workers=1, progress=False)
        b = prepare_dataset(source, tmp_path / f"b{fmt}", fmt, shard_size=4, workers=2, progress=False)
        assert a == b
        assert tree_bytes(tmp_path / f"a{fmt}") == tree_bytes(tmp_path / f"b{fmt}")


def test_bad_files_are_skipped_and_reported(tmp_path: Path, monkeypatch) -> None:
    root = make_source(tmp_path / "src", per_class=2)
    expected = add_bad_files(root)
    real_open = open

    def fake_open(path, *args, **kwargs):  # root can read any file: simulate a permission error
        if str(path).endswith("unreadable.jpg"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", fake_open)
    for fmt in FORMATS:
        m = prepare_dataset(root, tmp_path / fmt, fmt, shard_size=3, workers=1, progress=False)
        reasons = {b["path"]: b["reason"] for b in m["bad_files"]}
        assert set(reasons) == set(expected)
        for path, prefix in expected.items():
            assert reasons[path].startswith(prefix), reasons[path]
        src = sorted_sources(root)
        assert m["num_source_files"] == len(src) and m["num_samples"] == len(src) - len(expected)
        assert m["counts_per_class"] == {"class_0": 4, "class_1": 4, "class_2": 4}
        samples = read_samples(tmp_path / fmt / "train")
        bad_index = {i for i, (p, _) in enumerate(src) if p in expected}
        if fmt != "beton":
            assert set(samples) == set(range(len(src))) - bad_index
        assert len(samples) == m["num_samples"]


def test_all_files_bad_is_an_error(tmp_path: Path) -> None:
    for c in ("a", "b"):
        (tmp_path / "src" / c).mkdir(parents=True)
        (tmp_path / "src" / c / "x.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="no readable image"):
        prepare_dataset(tmp_path / "src", tmp_path / "out", "wds", workers=1, progress=False)


def test_argument_and_source_errors(source: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown format"):
        prepare_dataset(source, tmp_path, "zip")
    with pytest.raises(DataError, match="quality"):
        prepare_dataset(source, tmp_path, "wds", quality=0)
    with pytest.raises(DataError, match="not found"):
        prepare_dataset(tmp_path / "missing", tmp_path / "out", "wds")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="cannot create output folder"):
        prepare_dataset(source, tmp_path / "file", "wds", progress=False)


def test_rerun_same_settings_is_a_no_op_and_other_settings_need_overwrite(
    source: Path, tmp_path: Path
) -> None:
    m = prepare_dataset(source, tmp_path, "tfrecord", shard_size=6, workers=1, progress=False)
    before = tree_bytes(tmp_path)
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "train").iterdir()}
    assert prepare_dataset(source, tmp_path, "tfrecord", shard_size=6, workers=1, progress=False) == m
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "train").iterdir()} == mtimes
    with pytest.raises(DataError, match="--overwrite"):
        prepare_dataset(source, tmp_path, "tfrecord", shard_size=4, workers=1, progress=False)
    assert tree_bytes(tmp_path) == before
    m2 = prepare_dataset(
        source, tmp_path, "tfrecord", shard_size=4, workers=1, progress=False, overwrite=True
    )
    assert len(m2["shards"]) == 5
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == sorted(
        ["manifest.json"] + [s["path"] for s in m2["shards"]] + [s["index"] for s in m2["shards"]]
    )


def test_val_split_via_cli(source: Path, tmp_path: Path) -> None:
    from swav_fast.cli import main

    assert (
        main(
            [
                "prepare",
                "--src",
                str(source),
                "--val-src",
                str(source),
                "--format",
                "wds",
                "--out",
                str(tmp_path),
                "--shard-size",
                "10",
                "--workers",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    assert read_manifest(tmp_path / "train")["split"] == "train"
    val = read_manifest(tmp_path / "val")
    assert val["split"] == "val" and [s["path"] for s in val["shards"]] == ["val-00000.tar", "val-00001.tar"]


# ----------------------------------------------------------------------------- interruption
def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def run_until_pause(args: list[str], after_shards: int, timeout: float = 240.0) -> None:
    """Start ``swav-fast prepare`` in a subprocess, wait for the test pause mid-shard, SIGKILL it."""
    env = {**os.environ, PAUSE_ENV: str(after_shards)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "swav_fast", "prepare", *args, "--no-progress"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    sel = selectors.DefaultSelector()
    sel.register(proc.stderr, selectors.EVENT_READ)
    seen = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not sel.select(timeout=1.0):
                continue
            line = proc.stderr.readline()
            if not line:
                break
            seen.append(line)
            if PAUSE_MESSAGE in line:
                break
        else:
            raise AssertionError("prepare did not reach the test pause in time")
        assert PAUSE_MESSAGE in "".join(seen), "".join(seen)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("fmt,workers", [("tfrecord", 1), ("wds", 2), ("beton", 1)])
def test_killed_run_resumes_to_identical_output(source: Path, tmp_path: Path, fmt: str, workers: int) -> None:
    opts = dict(shard_size=4, workers=workers, progress=False)
    prepare_dataset(source, tmp_path / "ref", fmt, **opts)
    args = [
        "--src",
        str(source),
        "--format",
        fmt,
        "--out",
        str(tmp_path / "run"),
        "--shard-size",
        "4",
        "--workers",
        str(workers),
    ]
    run_until_pause(args, after_shards=2)
    split = tmp_path / "run" / "train"
    names = set(os.listdir(split))
    assert "manifest.json" not in names and ".prepare-work" in names
    assert any(n.endswith(".tmp") for n in names)  # killed with a shard half written
    if fmt != "beton":
        assert {"train-00000" + (".tfrecord" if fmt == "tfrecord" else ".tar"), "train-00001.idx"} <= names
    m = prepare_dataset(source, tmp_path / "run", fmt, **opts)
    assert m == read_manifest(tmp_path / "ref" / "train")
    assert tree_bytes(tmp_path / "run") == tree_bytes(tmp_path / "ref")  # no temp files, same bytes


def test_interrupted_run_with_other_settings_is_discarded(source: Path, tmp_path: Path) -> None:
    run_until_pause(
        [
            "--src",
            str(source),
            "--format",
            "wds",
            "--out",
            str(tmp_path / "run"),
            "--shard-size",
            "3",
            "--workers",
            "1",
        ],
        after_shards=1,
    )
    m = prepare_dataset(source, tmp_path / "run", "wds", shard_size=5, workers=1, progress=False)
    ref = tmp_path / "ref"
    assert prepare_dataset(source, ref, "wds", shard_size=5, workers=1, progress=False) == m
    assert tree_bytes(tmp_path / "run") == tree_bytes(ref)


# ----------------------------------------------------------------------------- formats
def test_tfrecord_example_encoding() -> None:
    assert crc32c(b"123456789") == _crc32c_python(b"123456789") == 0xE3069283
    rng = np.random.default_rng(0)
    blob = rng.bytes(1000)
    assert crc32c(blob) == _crc32c_python(blob)
    payload = encode_example(
        {"image/encoded": b"\xff\xd8abc", "image/class/label": 999, "image/index": [0, -1, 2**40]}
    )
    assert decode_example(payload) == {
        "image/encoded": [b"\xff\xd8abc"],
        "image/class/label": [999],
        "image/index": [0, -1, 2**40],
    }
    # hand-checked bytes of a one-feature Example: features{feature{key:"a" value{int64_list{value:[1]}}}}
    assert encode_example({"a": 1}) == bytes.fromhex("0a0c" "0a0a" "0a0161" "1205" "1a03" "0a01" "01")


def test_index_files_match_dali_tools(source: Path, tmp_path: Path) -> None:
    from wds2idx import IndexCreator  # shipped with nvidia-dali

    for fmt in ("wds", "tfrecord"):
        m = prepare_dataset(source, tmp_path / fmt, fmt, shard_size=7, workers=1, progress=False)
        for shard, index in shard_paths(tmp_path / fmt / "train", m):
            ref = tmp_path / "ref.idx"
            if fmt == "wds":
                with IndexCreator(shard, str(ref), verbose=False) as ic:
                    ic.create_index()
            else:
                tool = shutil.which("tfrecord2idx")
                assert tool, "tfrecord2idx (nvidia-dali) not on PATH"
                subprocess.run([sys.executable, tool, shard, str(ref)], check=True, capture_output=True)
            assert Path(index).read_bytes() == ref.read_bytes()


def test_dali_reads_tfrecord_and_wds(source: Path, tmp_path: Path) -> None:
    from nvidia.dali import fn, pipeline_def, types
    import nvidia.dali.tfrecord as tfrec

    src = sorted_sources(source)
    for fmt in ("tfrecord", "wds"):
        m = prepare_dataset(source, tmp_path / fmt, fmt, shard_size=7, workers=1, progress=False)
        paths = shard_paths(tmp_path / fmt / "train", m)

        @pipeline_def(batch_size=len(src), num_threads=1, device_id=None)
        def pipe():
            shards, indexes = [p for p, _ in paths], [i for _, i in paths]
            if fmt == "tfrecord":
                rec = fn.readers.tfrecord(
                    path=shards,
                    index_path=indexes,
                    features={
                        "image/encoded": tfrec.FixedLenFeature((), tfrec.string, ""),
                        "image/class/label": tfrec.FixedLenFeature([1], tfrec.int64, -1),
                        "image/index": tfrec.FixedLenFeature([1], tfrec.int64, -1),
                    },
                )
                jpg, label, index = rec["image/encoded"], rec["image/class/label"], rec["image/index"]
            else:
                jpg, label = fn.readers.webdataset(
                    paths=shards, index_paths=indexes, ext=["jpg", "cls"], missing_component_behavior="error"
                )
                index = label
            return fn.decoders.image(jpg, device="cpu", output_type=types.RGB), label, index

        p = pipe()
        p.build()
        images, labels, indices = p.run()
        if fmt == "tfrecord":
            got_labels = [int(np.array(labels.at(k))[0]) for k in range(len(src))]
            assert [int(np.array(indices.at(k))[0]) for k in range(len(src))] == list(range(len(src)))
        else:
            got_labels = [int(bytes(np.array(labels.at(k))).decode("ascii")) for k in range(len(src))]
        assert got_labels == [lab for _, lab in src]
        for k, (rel, _) in enumerate(src):
            ref = reference_rgb(source / rel)
            assert np.array(images.at(k)).shape == ref.shape, rel
            assert psnr(np.array(images.at(k), dtype=np.float64), ref) > 30, rel
