"""The formats layer (``pipelines.formats``), the bad-sample policy, the prefetch thread, and the readers
of every backend: each format round-trips writer -> reader (index included), the writers' bytes are
unchanged, every backend reads the formats it declares (and the README's table says so), and
``pipelines`` stands without ``swav_fast``."""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.badsamples import BadSamples
from pipelines.errors import ConfigError, DataError
from pipelines.formats import probe
from pipelines.formats.beton import BetonSource, BetonWriter, read_beton_tables
from pipelines.formats.folder import ImageFolderSource, ImageFolderWriter
from pipelines.formats.manifest import FORMATS, read_manifest, write_json_atomic
from pipelines.formats.sources import detect_format, open_source
from pipelines.formats.tfrecord import (
    TFRecordShardWriter,
    TFRecordSource,
    decode_example,
    iter_tfrecord_offsets,
    read_tfrecord_index,
    scan_tfrecord,
)
from pipelines.formats.wds import (
    WdsShardWriter,
    WebDatasetSource,
    group_samples,
    index_text,
    read_wds_index,
    tar_members,
)
from pipelines.prefetch import Prefetcher
from tests.helpers import write_image_folder
from tests.test_dali_copy import needs_dali

REPO = Path(__file__).resolve().parents[1]


def payload(i: int) -> bytes:
    """Deterministic JPEG-like bytes (the writers do not decode what they store)."""
    return bytes([0xFF, 0xD8, 0xFF]) + bytes((i * 7 + k) % 251 for k in range(100 + 37 * i)) + b"\xff\xd9"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def jpeg(w: int, h: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def manifest_for(fmt: str, entries: list[dict], classes: list[str], counts: dict[str, int]) -> dict:
    n = sum(e["num_samples"] for e in entries)
    return {"format": fmt, "num_samples": n, "classes": classes,
            "class_to_idx": {c: i for i, c in enumerate(classes)}, "counts_per_class": counts,
            "shards": entries, "bad_files": []}


# ----------------------------------------------------------------------------- writers: same bytes
# SHA-256 of the shards and index files written by the writers before they moved into
# pipelines.formats (swav_fast/prepare/writers.py and beton.py at commit e1369e4), for the same input.
OLD_BYTES = {
    "tfrecord": ("85b42d101bab6acf7ac413e06459563737f5b0e9626766eea25030f2abe6c5a0",
                 "fd414316676543babb00a5b7d220d57660e51c7646b822cbaa0bb71abbd88d23", 1371, 39),
    "wds": ("c36c259fc8cc6f730842c3d117ae4c6e29cf9d461f35d69cbfd74df92b447653",
            "9aeb79f71f210ba6d442cbfe302b154bf902d04306cd18169650146fe4a0dfb1", 20480, 256),
    "beton": ("a0e3414e9c6d473320c14aed242bab72c1647997117fe530cc44dd0f48671e24", None, 4194424, None),
}


def write_shard(fmt: str, d: Path) -> dict:
    if fmt == "beton":
        w = BetonWriter(d / "train.beton", 5, 1 << 21)
        for i in range(5):
            w.add(i % 3, payload(i), 10 + i, 20 + i)
            if i == 2:
                w.checkpoint()
        return w.close()
    w = TFRecordShardWriter(d, "train", 3) if fmt == "tfrecord" else WdsShardWriter(d, "train", 3, 8)
    for i in range(5):
        w.add(10 + i, i % 3, payload(i))
    return w.close()


@pytest.mark.parametrize("fmt", FORMATS)
def test_writers_bytes_are_unchanged(tmp_path: Path, fmt: str) -> None:
    entry = write_shard(fmt, tmp_path)
    data_sha, idx_sha, size, idx_size = OLD_BYTES[fmt]
    assert (entry["sha256"], entry["bytes"]) == (data_sha, size)
    assert sha(tmp_path / entry["path"]) == data_sha
    if idx_sha is not None:
        assert (entry["index_sha256"], entry["index_bytes"]) == (idx_sha, idx_size)
        assert sha(tmp_path / entry["index"]) == idx_sha
    assert not list(tmp_path.glob("*.tmp"))


# ----------------------------------------------------------------------------- round trips
def test_tfrecord_round_trip_and_index(tmp_path: Path) -> None:
    entry = write_shard("tfrecord", tmp_path)
    shard, idx = tmp_path / entry["path"], tmp_path / entry["index"]
    with open(shard, "rb") as f:
        walked = list(iter_tfrecord_offsets(f, shard.stat().st_size, check_crc=True))
    assert read_tfrecord_index(str(idx)).tolist() == [list(r) for r in walked]
    assert scan_tfrecord(str(shard)).tolist() == [list(r) for r in walked]
    m = manifest_for("tfrecord", [entry], ["a", "b", "c"], {"a": 2, "b": 2, "c": 1})
    src = TFRecordSource(str(tmp_path), m)
    assert len(src) == 5
    assert [src.read(i) for i in range(5)] == [(payload(i), i % 3) for i in range(5)]
    with open(shard, "rb") as f:
        f.seek(walked[1][0] + 12)
        ex = decode_example(f.read(walked[1][1] - 16))
    assert ex["image/index"] == [11]
    idx.unlink()  # rebuilt from the record headers
    assert [TFRecordSource(str(tmp_path), m).read(i) for i in range(5)] == [(payload(i), i % 3) for i in range(5)]


def test_wds_round_trip_and_index(tmp_path: Path) -> None:
    entry = write_shard("wds", tmp_path)
    shard, idx = tmp_path / entry["path"], tmp_path / entry["index"]
    with open(shard, "rb") as f:
        samples = group_samples(tar_members(f, shard.stat().st_size))
    assert idx.read_text().splitlines() == index_text(samples)
    assert read_wds_index(str(idx)) == samples
    assert [s[0][3] for s in samples] == [f"{10 + i:08d}.jpg" for i in range(5)]
    m = manifest_for("wds", [entry], ["a", "b", "c"], {"a": 2, "b": 2, "c": 1})
    src = WebDatasetSource(str(tmp_path), m)
    assert [(bytes(b), lab) for b, lab in (src.read(i) for i in range(5))] == [(payload(i), i % 3) for i in range(5)]
    assert src.name(2).endswith("train-00003.tar#00000012")
    with open(shard, "r+b") as f:  # truncated: the walk says so
        f.truncate(shard.stat().st_size // 2)
    with open(shard, "rb") as f, pytest.raises(ValueError, match="truncated"):
        tar_members(f, shard.stat().st_size)


def test_beton_round_trip(tmp_path: Path) -> None:
    entry = write_shard("beton", tmp_path)
    header, _, meta, _ = read_beton_tables(tmp_path / entry["path"])
    assert int(header["num_samples"]) == 5 and meta["f0"]["width"].tolist() == [10, 11, 12, 13, 14]
    src = BetonSource(tmp_path / entry["path"])
    assert [src.read(i) for i in range(5)] == [(payload(i), i % 3) for i in range(5)]
    src.close()


def test_folder_round_trip(tmp_path: Path) -> None:
    w = ImageFolderWriter(tmp_path / "f", ["cat", "dog"])
    data = [jpeg(9 + i, 7, seed=i) for i in range(4)]
    for i, d in enumerate(data):
        w.add(i, i % 2, d)
    src = open_source(tmp_path / "f")
    assert isinstance(src, ImageFolderSource) and src.classes == ["cat", "dog"]
    assert detect_format(tmp_path / "f") == "folder"
    # scan order: class, then file name
    assert [(bytes(b), lab) for b, lab in (src.read(i) for i in range(4))] == [
        (data[0], 0), (data[2], 0), (data[1], 1), (data[3], 1)]


def test_manifest_write_read_and_format_errors(tmp_path: Path) -> None:
    entry = write_shard("tfrecord", tmp_path)
    write_json_atomic(tmp_path / "manifest.json", manifest_for("tfrecord", [entry], ["a", "b", "c"],
                                                                 {"a": 2, "b": 2, "c": 1}))
    assert read_manifest(tmp_path)["num_samples"] == 5
    assert detect_format(tmp_path) == "tfrecord"
    assert isinstance(open_source(tmp_path), TFRecordSource)
    with pytest.raises(ConfigError, match="does not read; read it with data.loader=dali or pil or torch"):
        open_source(tmp_path, formats=("beton",))
    with pytest.raises(DataError, match="dataset folder not found"):
        open_source(tmp_path / "missing")


def test_probe_is_the_one_header_check() -> None:
    good = jpeg(40, 30)
    assert probe.image_size(good) == probe.jpeg_size(good) == (40, 30)
    assert probe.jpeg_size(bytearray(good)) == (40, 30)
    for bad, why in ((b"", "empty"), (good[:-300], "truncated"), (b"\xff\xd8\xff\xd9", "JPEG"),
                     (b"not an image at all", "not a readable image")):
        with pytest.raises(probe.BadImage, match=why):
            probe.image_size(bad)
    assert issubclass(probe.BadImage, DataError) and issubclass(probe.BadImage, ValueError)
    # the one BadImage: prepare's and the loaders' are the same class
    from swav_fast.prepare.sources import BadImage as PrepareBadImage
    assert PrepareBadImage is probe.BadImage


# ----------------------------------------------------------------------------- bad samples
def test_bad_samples_replace_and_skip(caplog: pytest.LogCaptureFixture) -> None:
    bad = {2, 3}

    def load(j: int) -> int:
        if j in bad:
            raise probe.BadImage(f"sample {j} is broken")
        return j * 10

    names = lambda j: f"f{j}"  # noqa: E731
    rep = BadSamples("replace")
    assert rep.resolve(1, 6, load, names) == (1, 10, [])
    assert rep.resolve(2, 6, load, names) == (4, 40, ["f2", "f3"])
    assert rep.resolve(3, 6, load, names) == (4, 40, ["f3"])
    assert rep.count == 3 and sorted(rep.reasons) == ["f2", "f3"]
    warned = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(warned) == 2  # each file once
    assert rep.summary().startswith("2 unreadable image(s) replaced (3 time(s)): f2, f3")

    skip = BadSamples("skip")
    assert skip.resolve(2, 6, load, names) == (2, None, ["f2"])
    assert skip.resolve(4, 6, load, names) == (4, 40, [])
    assert skip.count == 1 and "skipped" in skip.summary()

    def unreadable(j: int) -> int:
        raise OSError(f"cannot read {j}")

    with pytest.raises(DataError, match="6 consecutive unreadable"):
        BadSamples("replace").resolve(0, 6, unreadable, names)
    remembered = BadSamples("replace", remember=True)
    remembered.resolve(2, 6, load, names)
    bad.clear()  # fixed on disk, but a remembered file is not tried again
    assert remembered.resolve(2, 6, load, names)[0] == 4 and BadSamples().resolve(2, 6, load, names)[0] == 2
    with pytest.raises(ConfigError, match="bad_samples"):
        BadSamples("ignore")


def test_loaders_skip_policy(tmp_path: Path) -> None:
    from pipelines import MultiCropSpec, build_loader

    root = write_image_folder(tmp_path / "data", classes=2, per_class=4)
    (root / "class_0" / "img_1.jpg").write_bytes(b"broken")
    spec = MultiCropSpec(num_crops=[2], size_crops=[16], min_scale_crops=[0.14], max_scale_crops=[1.0], dtype="float32")
    for backend in ("pil", "torch"):
        for policy, sizes in (("replace", [8]), ("skip", [7])):
            ld = build_loader(root, spec, 8, backend=backend, bad_samples=policy)
            (batch,) = list(ld)
            assert [len(batch)] == sizes and ld.num_bad == 1, (backend, policy)
            assert batch.views[0].shape[0] == sizes[0] and len(batch.indices) == sizes[0]
            assert ld.bad_paths == [str(root / "class_0" / "img_1.jpg")]
            ld.close()


@needs_dali
def test_dali_skip_policy(tmp_path: Path) -> None:
    from pipelines import MultiCropSpec, build_loader

    root = write_image_folder(tmp_path / "data", classes=2, per_class=8)
    (root / "class_0" / "img_1.jpg").write_bytes(b"broken")
    spec = MultiCropSpec(num_crops=[2], size_crops=[16], min_scale_crops=[0.14], max_scale_crops=[1.0],
                         dtype="float32")
    for policy, sizes in (("replace", [8, 8]), ("skip", [7, 8])):
        ld = build_loader(root, spec, 8, backend="dali", bad_samples=policy, num_workers=1)
        batches = list(ld)
        assert sorted(len(b) for b in batches) == sizes and ld.num_bad == 1, policy
        assert all(b.views[0].shape[0] == len(b) == len(b.indices) for b in batches)
        assert ld.bad_paths == [str(root / "class_0" / "img_1.jpg")]
        ld.close()


# ----------------------------------------------------------------------------- prefetch
def test_prefetcher_order_errors_and_close() -> None:
    assert list(Prefetcher(iter(range(20)), depth=3)) == list(range(20))

    def failing():
        yield 1
        yield 2
        raise DataError("disk gone")

    pf = Prefetcher(failing(), depth=1)
    assert pf.get() == 1 and pf.get() == 2
    with pytest.raises(DataError, match="disk gone"):
        pf.get()
    with pytest.raises(StopIteration):
        pf.get()
    pf.close()

    produced, closed = [], threading.Event()

    def endless():
        try:
            k = 0
            while True:
                produced.append(k)
                yield k
                k += 1
        finally:
            closed.set()

    pf = Prefetcher(endless(), depth=2, name="test-prefetch")
    assert pf.get() == 0
    time.sleep(0.05)
    assert len(produced) <= 4  # bounded: at most depth ahead (+ the one being put)
    pf.close()
    assert not pf.alive and closed.wait(1.0)
    pf.close()  # idempotent
    with Prefetcher(endless(), depth=2) as pf2:
        it = iter(pf2)
        assert next(it) == 0
    assert not pf2.alive
    with pytest.raises(ValueError, match="depth"):
        Prefetcher(iter(()), depth=0)


# ----------------------------------------------------------------------------- every backend, every format
@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from swav_fast.prepare import prepare_dataset

    tmp = tmp_path_factory.mktemp("formats")
    folder = write_image_folder(tmp / "folder", classes=3, per_class=6)
    out = {"folder": folder}
    for fmt in ("tfrecord", "wds"):
        prepare_dataset(folder, tmp / fmt, fmt, shard_size=7, workers=1, progress=False)
        out[fmt] = tmp / fmt / "train"
    return out


@pytest.mark.parametrize("backend", ["pil", "torch"])
def test_backends_read_tfrecord_and_wds_like_the_folder(prepared: dict[str, Path], backend: str) -> None:
    from pipelines import MultiCropSpec, build_loader

    spec = MultiCropSpec(num_crops=[2, 1], size_crops=[24, 12], dtype="float32")
    batches = {}
    for fmt, path in prepared.items():
        ld = build_loader(path, spec, 6, backend=backend, seed=5)
        ld.set_epoch(1)
        batches[fmt] = list(ld)
        ld.close()
        assert ld.classes == ["class_0", "class_1", "class_2"]
    ref = batches["folder"]
    assert len(ref) == 3
    for fmt in ("tfrecord", "wds"):
        for a, b in zip(ref, batches[fmt]):
            assert a.indices.tolist() == b.indices.tolist() and a.labels.tolist() == b.labels.tolist()
            for va, vb in zip(a.views, b.views):
                assert va.shape == vb.shape and bool((va == vb).all()), (backend, fmt)


def test_ffcv_refused_by_backends_that_do_not_read_it(prepared: dict[str, Path]) -> None:
    from pipelines import MultiCropSpec, build_loader

    spec = MultiCropSpec(num_crops=[2], size_crops=[16], min_scale_crops=[0.14], max_scale_crops=[1.0], dtype="float32")
    with pytest.raises(ConfigError, match="ImageFolder.*data.loader=dali or pil or torch"):
        open_source(prepared["folder"], formats=("beton",))
    with pytest.raises(ConfigError, match="data.loader=ffcv"):
        m = json.loads((prepared["wds"] / "manifest.json").read_text())
        fake = prepared["wds"].parent / "as_beton"
        fake.mkdir(exist_ok=True)
        (fake / "manifest.json").write_text(json.dumps({**m, "format": "beton", "shards": [
            {**m["shards"][0], "path": "train.beton", "num_samples": m["num_samples"]}]}))
        (fake / "train.beton").write_bytes(b"")
        build_loader(fake, spec, 2, backend="pil")


def test_readme_backend_table_is_true() -> None:
    from pipelines.loader import available_backends, backend_formats

    text = (REPO / "README.md").read_text(encoding="utf-8")
    header = next(line for line in text.splitlines() if re.match(r"\s*\| backend \| ImageFolder", line))
    cols = ["folder", "tfrecord", "wds", "beton"]
    assert len([c for c in header.split("|") if c.strip()]) == 1 + len(cols)
    rows = {}
    for line in text.splitlines():
        m = re.match(r"\s*\| `(\w+)` \|((?: (?:yes|no) \|)+)\s*$", line)
        if m:
            rows[m.group(1)] = tuple(c for c, v in zip(cols, m.group(2).split("|")) if v.strip() == "yes")
    builtin = {"pil", "torch", "dali", "ffcv"}  # tests may register plug-in backends of their own
    assert set(rows) == builtin and builtin <= set(available_backends())
    for name in builtin:
        assert rows[name] == backend_formats(name), name


# ----------------------------------------------------------------------------- layering
def test_pipelines_imports_without_swav_fast() -> None:
    modules = sorted(
        ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        for p in (REPO / "pipelines").rglob("*.py"))
    code = (
        "import importlib, importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'swav_fast' or name.startswith('swav_fast.'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'swav_fast']\n"
        "print('ok', len(" + repr(modules) + "))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ok")
    assert "pipelines.formats.sources" in modules and "pipelines.dali_backend" in modules
    # and no module of pipelines names swav_fast in an import statement
    offenders = [str(p) for p in (REPO / "pipelines").rglob("*.py")
                 if re.search(r"^\s*(from|import) swav_fast", p.read_text(encoding="utf-8"), re.M)]
    assert not offenders
