"""The ``dali`` loader backend on the CPU (``device_id=None``): readers, crops, statistics, order, bad files.

Needs the ``dali`` extra (``nvidia-dali-cuda130``).  GPU tests (``mixed`` decoding) carry ``gpu``.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import MultiCropSpec, scan_image_folder
from pipelines import dali_backend
from pipelines.dali_backend import DALILoader
from pipelines.formats.probe import BadImage, image_size
from pipelines.formats.sources import open_source
from pipelines.formats.tfrecord import TFRecordSource
from pipelines.formats.tfrecord import decode_example as parse_example
from pipelines.formats.wds import WebDatasetSource
from pipelines.loader import available_backends
from swav_fast.errors import ConfigError, DataError
from tests.helpers import write_image_folder
from tests.test_dali_copy import needs_dali

ROOT = Path(__file__).resolve().parents[1]
SMALL = MultiCropSpec(num_crops=[2, 3], size_crops=[24, 12], dtype="float32")


def binomial_ok(k: int, n: int, p: float, z: float = 4.5) -> bool:
    """``k`` successes in ``n`` trials is within ``z`` standard deviations of ``n p``."""
    return abs(k - n * p) <= z * math.sqrt(n * p * (1 - p)) + 1


# -- fixtures: images, TFRecord and webdataset shards ----------------------------------------------
def ramp_image(w: int, h: int, phase: int) -> np.ndarray:
    """Linear ramps: R grows with x, G with y, B with x + y (so crops, flips and gray are visible)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 20 + 200 * x / (w - 1)
    g = 30 + 180 * y / (h - 1)
    b = 20 + (phase * 7) % 60 + 150 * (x + y) / (w + h)
    return np.stack([r, g, b], axis=-1).round().astype(np.uint8)


def write_ramp_folder(root: Path, classes: int = 3, per_class: int = 8, size=(80, 60),
                      fmt: str = "PNG") -> Path:
    for c in range(classes):
        d = root / f"c{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = size[0] + 8 * (i % 3), size[1] + 4 * (i % 2)
            ext = "png" if fmt == "PNG" else "jpg"
            Image.fromarray(ramp_image(w, h, c * per_class + i)).save(d / f"{i:03d}.{ext}", fmt)
    return root


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _len_field(num: int, payload: bytes) -> bytes:
    return _varint(num << 3 | 2) + _varint(len(payload)) + payload


def encode_example(features: dict[str, bytes | list[int]], packed: bool = True) -> bytes:
    """A serialized tf.train.Example written from the protobuf wire format (no tensorflow)."""
    entries = b""
    for key, value in features.items():
        if isinstance(value, bytes):
            feature = _len_field(1, _len_field(1, value))  # Feature.bytes_list.value
        elif packed:
            feature = _len_field(3, _len_field(1, b"".join(_varint(v) for v in value)))
        else:
            feature = _len_field(3, b"".join(_varint(1 << 3 | 0) + _varint(v) for v in value))
        entries += _len_field(1, _len_field(1, key.encode()) + _len_field(2, feature))
    return _len_field(1, entries)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_tfrecord_split(folder: Path, out: Path, shards: int = 2) -> Path:
    """TFRecord shards + tfrecord2idx-format indexes + manifest, samples in ImageFolder scan order."""
    index = scan_image_folder(folder)
    out.mkdir(parents=True)
    chunks = np.array_split(np.arange(len(index)), shards)
    entries = []
    for k, chunk in enumerate(chunks):
        shard, idx = out / f"train-{k:05d}.tfrecord", out / f"train-{k:05d}.idx"
        lines, blob = [], b""
        for i in chunk:
            data = encode_example({"image/encoded": Path(index.path(i)).read_bytes(),
                                   "image/class/label": [index.label(i)], "image/index": [int(i)]},
                                  packed=bool(i % 2))
            record = struct.pack("<Q", len(data)) + b"\0" * 4 + data + b"\0" * 4
            lines.append(f"{len(blob)} {len(record)}")
            blob += record
        shard.write_bytes(blob)
        idx.write_text("\n".join(lines) + "\n")
        entries.append({"path": shard.name, "index": idx.name, "num_samples": len(chunk),
                        "bytes": len(blob), "sha256": _sha(shard)})
    _write_manifest(out, "tfrecord", index, entries)
    return out


def write_wds_split(folder: Path, out: Path, shards: int = 2) -> Path:
    """webdataset tars (``<key>.jpg`` / ``<key>.cls``) + wds2idx indexes + manifest."""
    import wds2idx

    index = scan_image_folder(folder)
    out.mkdir(parents=True)
    entries = []
    for k, chunk in enumerate(np.array_split(np.arange(len(index)), shards)):
        shard, idx = out / f"train-{k:05d}.tar", out / f"train-{k:05d}.idx"
        with tarfile.open(shard, "w") as tar:
            for i in chunk:
                members = (("jpg", Path(index.path(i)).read_bytes()), ("cls", f"{index.label(i)}\n".encode()))
                for ext, payload in members:
                    info = tarfile.TarInfo(f"{int(i):08d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        with wds2idx.IndexCreator(str(shard), str(idx), verbose=False) as creator:
            creator.create_index()
        entries.append({"path": shard.name, "index": idx.name, "num_samples": len(chunk),
                        "bytes": shard.stat().st_size, "sha256": _sha(shard)})
    _write_manifest(out, "wds", index, entries)
    return out


def _write_manifest(out: Path, fmt: str, index, shards: list[dict]) -> None:
    counts = np.bincount([c for _, c in index.samples], minlength=len(index.classes)).tolist()
    (out / "manifest.json").write_text(json.dumps({
        "format": fmt, "num_samples": len(index), "classes": index.classes,
        "class_to_idx": {c: i for i, c in enumerate(index.classes)},
        "counts_per_class": dict(zip(index.classes, counts)), "shards": shards, "bad_files": []}))


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("jpeg") / "data", classes=3, per_class=8, size=(48, 40))


@pytest.fixture(scope="module")
def ramp_folder(tmp_path_factory) -> Path:
    return write_ramp_folder(tmp_path_factory.mktemp("ramp") / "data")


def collect(loader, epoch: int = 0, start_batch: int = 0):
    loader.set_epoch(epoch, start_batch)
    return list(loader)


# -- header checks and record parsing ----------------------------------------------------------
def test_image_size_reads_headers_and_rejects_bad_files(jpeg_folder, ramp_folder, tmp_path):
    for path in [*sorted(jpeg_folder.rglob("*.jpg"))[:3], *sorted(ramp_folder.rglob("*.png"))[:3]]:
        with Image.open(path) as im:
            assert image_size(path.read_bytes()) == im.size
    gray = io.BytesIO()
    Image.new("L", (33, 17), 128).save(gray, "JPEG", progressive=True)
    assert image_size(gray.getvalue()) == (33, 17)
    bmp = io.BytesIO()
    Image.new("RGB", (9, 7)).save(bmp, "BMP")
    assert image_size(bmp.getvalue()) == (9, 7)

    good = sorted(jpeg_folder.rglob("*.jpg"))[0].read_bytes()
    png = sorted(ramp_folder.rglob("*.png"))[0].read_bytes()
    bad = {"empty": b"", "truncated JPEG": good[:len(good) // 2], "truncated PNG": png[:len(png) - 30],
           "garbage": bytes(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8)),
           "text": b"this is not an image\n" * 20}
    for name, data in bad.items():
        with pytest.raises(BadImage):
            image_size(data)
            pytest.fail(f"{name} accepted")


def test_parse_example_round_trip():
    payload = bytes(range(256)) * 3
    for packed in (True, False):
        ex = parse_example(encode_example({"image/encoded": payload, "image/class/label": [7],
                                           "image/index": [123456789012, -3]}, packed=packed))
        assert ex["image/encoded"] == [payload]
        assert ex["image/class/label"] == [7]
        assert ex["image/index"] == [123456789012, -3]


def test_sources_read_the_same_samples(jpeg_folder, tmp_path):
    folder = open_source(jpeg_folder)
    tf = open_source(write_tfrecord_split(jpeg_folder, tmp_path / "tf", shards=3))
    wds = open_source(write_wds_split(jpeg_folder, tmp_path / "wds", shards=2))
    assert isinstance(tf, TFRecordSource) and isinstance(wds, WebDatasetSource)
    assert len(folder) == len(tf) == len(wds) == 24
    assert folder.classes == tf.classes == wds.classes
    for i in range(len(folder)):
        data, label = folder.read(i)
        assert tf.read(i) == (data, label)
        assert bytes(wds.read(i)[0]) == data and wds.read(i)[1] == label
    assert wds.name(5).endswith("train-00000.tar#00000005")


def test_missing_index_is_rebuilt_and_counts_are_checked(jpeg_folder, tmp_path):
    tf_dir = write_tfrecord_split(jpeg_folder, tmp_path / "tf")
    wds_dir = write_wds_split(jpeg_folder, tmp_path / "wds")
    ref_tf, ref_wds = open_source(tf_dir), open_source(wds_dir)
    (tf_dir / "train-00001.idx").unlink()
    (wds_dir / "train-00000.idx").unlink()
    tf, wds = open_source(tf_dir), open_source(wds_dir)
    for i in (0, 13, 23):
        assert tf.read(i) == ref_tf.read(i)
        assert bytes(wds.read(i)[0]) == bytes(ref_wds.read(i)[0]) and wds.read(i)[1] == ref_wds.read(i)[1]

    manifest = json.loads((tf_dir / "manifest.json").read_text())
    manifest["shards"][0]["num_samples"] += 1  # consistent manifest, but the shard holds one record less
    manifest["num_samples"] += 1
    manifest["counts_per_class"][manifest["classes"][0]] += 1
    (tf_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="manifest says"):
        open_source(tf_dir)
    write_tfrecord_split(jpeg_folder, tmp_path / "prep" / "train")
    with pytest.raises(DataError, match="train"):  # the parent of a split folder is not a dataset
        open_source(tmp_path / "prep")
    manifest = json.loads((wds_dir / "manifest.json").read_text())
    manifest["format"] = "beton"
    (wds_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="ffcv"):  # a beton for a backend that does not read it
        open_source(wds_dir, formats=dali_backend.FORMATS)


@pytest.mark.parametrize("fmt", ["tfrecord", "wds"])
def test_reads_datasets_written_by_prepare(jpeg_folder, tmp_path, fmt):
    """``swav-fast prepare`` output: every image once per epoch, with the label of its source file."""
    from swav_fast.prepare import prepare_dataset

    prepare_dataset(jpeg_folder, tmp_path / "out", fmt, shard_size=10, workers=1, progress=False)
    loader = DALILoader(tmp_path / "out" / "train", SMALL, batch_size=8, num_workers=1, drop_last=False)
    assert len(loader) == 3 and loader.classes == scan_image_folder(jpeg_folder).classes
    label_of = {p.read_bytes(): scan_image_folder(jpeg_folder).classes.index(p.parent.name)
                for p in jpeg_folder.rglob("*.jpg")}
    batches = collect(loader)
    assert sorted(torch.cat([b.indices for b in batches]).tolist()) == list(range(24))
    for b in batches:
        for i, label in zip(b.indices.tolist(), b.labels.tolist()):
            data, stored = loader.source.read(i)
            assert stored == label == label_of[bytes(data)]
        assert b.num_bad == 0 and b.views[0].shape == (len(b), 3, 24, 24)


# -- outputs ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,channels_last", [("float32", False), ("bfloat16", True)])
def test_batch_shapes_dtypes_format_and_ranges(jpeg_folder, dtype, channels_last):
    spec = SMALL.replace(dtype=dtype, channels_last=channels_last)
    loader = DALILoader(jpeg_folder, spec, batch_size=5, num_workers=1, seed=3)
    assert "dali" in available_backends()
    assert len(loader) == 4
    batches = collect(loader)
    assert len(batches) == 4
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for batch in batches:
        assert len(batch.views) == spec.num_views
        for v, view in enumerate(batch.views):
            s = spec.view_sizes[v]
            assert view.shape == (5, 3, s, s) and view.dtype == spec.torch_dtype and view.device.type == "cpu"
            assert view.is_contiguous(memory_format=fmt)
            x = view.float() * std + mean  # back to [0, 1]
            assert torch.isfinite(x).all()
            assert x.min() >= -0.02 and x.max() <= 1.02
        assert batch.labels.dtype == torch.int64 and batch.indices.dtype == torch.int64
        assert batch.num_bad == 0
        index = loader.source
        assert all(index.read(int(i))[1] == int(lab) for i, lab in zip(batch.indices, batch.labels))


def test_crops_match_the_reference_crop_resize_flip(ramp_folder):
    """DALI's crop + resize + flip of each view equals PIL's of the same box (bilinear, antialiased)."""
    spec = MultiCropSpec(num_crops=[1, 2], size_crops=[32, 16])
    loader = DALILoader(ramp_folder, spec, batch_size=6, num_workers=1, seed=0)
    index = scan_image_folder(ramp_folder)
    checked = flips = 0
    for crops, issued in loader.iterate_crops(0):
        for b, j in enumerate(issued.sources):
            with Image.open(index.path(int(j))) as im:
                img = im.convert("RGB")
                for v, crop in enumerate(crops):
                    p = issued.params[v].row(b)
                    ref = img.crop((p.left, p.top, p.left + p.width, p.top + p.height))
                    ref = ref.resize((p.size, p.size), Image.Resampling.BILINEAR)
                    if p.flip:
                        ref = ref.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                    ref_t = torch.from_numpy(np.array(ref)).permute(2, 0, 1).float()
                    diff = (crop[b].float() - ref_t).abs()
                    assert diff.mean() < 1.0 and diff.max() <= 6, (int(j), v, p, float(diff.mean()))
                    # the ramp's direction shows the flip: R grows to the right unless flipped
                    slope = float(crop[b, 0, :, -1].float().mean() - crop[b, 0, :, 0].float().mean())
                    assert (slope < 0) == p.flip
                    checked += 1
                    flips += p.flip
    assert checked == 24 * 3 and 0 < flips < checked


def test_augmentation_follows_the_shared_draw(ramp_folder):
    """The parameters fed to DALI are the shared generator's (pipelines.params, whose statistics
    tests/test_randomness.py checks) for each sample actually decoded and its header size; on the output
    pixels, views that drew grayscale are gray and the gray rate is binomial in grayscale_p."""
    from pipelines.params import params_equal, sample_params_for_indices

    spec = MultiCropSpec(num_crops=[2, 6], size_crops=[16, 8], dtype="float32")
    loader = DALILoader(ramp_folder, spec, batch_size=8, num_workers=1, seed=11)
    gray_pixels = gray_missed = n = 0
    index = scan_image_folder(ramp_folder)
    sizes = {}
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    for epoch in range(4):
        for batch, issued in loader.iterate_with_record(epoch):
            for j in issued.sources:
                if int(j) not in sizes:
                    with Image.open(index.path(int(j))) as im:
                        sizes[int(j)] = im.size
            w, h = np.array([sizes[int(j)] for j in issued.sources]).T
            ref = sample_params_for_indices(spec, 11, epoch, issued.sources, w, h)
            assert all(params_equal(p, q) for p, q in zip(issued.params, ref))
            for v, view in enumerate(batch.views):
                p = issued.params[v]
                x = view * std + mean
                is_gray = ((x[:, 0] - x[:, 1]).abs().amax(dim=(1, 2)) < 1e-4) & \
                          ((x[:, 1] - x[:, 2]).abs().amax(dim=(1, 2)) < 1e-4)
                gray_pixels += int(is_gray.sum())
                gray_missed += int((~is_gray.numpy() & p.grayscale).sum())
                n += len(p.flip)
    assert n == 4 * 24 * 8
    assert binomial_ok(gray_pixels, n, spec.grayscale_p)  # measured on the output pixels
    assert gray_missed == 0  # every view that drew grayscale is gray (others may clamp to gray rarely)


# -- order: sharding, epochs, seeds, resume ------------------------------------------------------
def test_ranks_are_disjoint_and_cover_the_epoch(jpeg_folder):
    seen = []
    for rank in range(3):
        loader = DALILoader(jpeg_folder, SMALL, batch_size=4, rank=rank, world_size=3, num_workers=1, seed=5)
        assert len(loader) == 2
        seen.append(torch.cat([b.indices for b in collect(loader, epoch=2)]).tolist())
    assert all(len(s) == 8 for s in seen)
    assert all(set(seen[r]).isdisjoint(seen[q]) for r in range(3) for q in range(r))
    assert sorted(sum(seen, [])) == list(range(24))


def test_reshuffle_same_seed_and_exact_resume(jpeg_folder):
    a = DALILoader(jpeg_folder, SMALL, batch_size=4, num_workers=1, seed=7)
    b = DALILoader(jpeg_folder, SMALL, batch_size=4, num_workers=1, seed=7)
    e0, e1 = collect(a, 0), collect(a, 1)
    order0, order1 = torch.cat([x.indices for x in e0]), torch.cat([x.indices for x in e1])
    assert sorted(order0.tolist()) == sorted(order1.tolist()) == list(range(24))
    assert not torch.equal(order0, order1)
    again = collect(b, 1)
    for x, y in zip(e1, again):  # same seed: same order and the same pixels
        assert torch.equal(x.indices, y.indices)
        assert all(torch.equal(u, w) for u, w in zip(x.views, y.views))
    # a pass stopped early, then a resume at batch 3 of epoch 1: identical to the tail of the full pass
    b.set_epoch(0)
    next(iter(b))
    tail = collect(b, 1, start_batch=3)
    assert len(tail) == 3
    for x, y in zip(e1[3:], tail):
        assert torch.equal(x.indices, y.indices) and torch.equal(x.labels, y.labels)
        assert all(torch.equal(u, w) for u, w in zip(x.views, y.views))


def test_formats_give_identical_batches(jpeg_folder, tmp_path):
    """ImageFolder, TFRecord and webdataset hold the same images in the same order: same batches."""
    tf_dir = write_tfrecord_split(jpeg_folder, tmp_path / "tf")
    wds_dir = write_wds_split(jpeg_folder, tmp_path / "wds", shards=3)
    runs = [collect(DALILoader(src, SMALL, batch_size=6, num_workers=1, seed=2, rank=1, world_size=2),
                    epoch=1) for src in (jpeg_folder, tf_dir, wds_dir)]
    for other in runs[1:]:
        assert len(other) == len(runs[0]) == 2
        for x, y in zip(runs[0], other):
            assert torch.equal(x.indices, y.indices) and torch.equal(x.labels, y.labels)
            assert all(torch.equal(u, w) for u, w in zip(x.views, y.views))


# -- bad files ------------------------------------------------------------------------------------
def _no_quant_table(jpeg: bytes) -> bytes:
    """A JPEG whose header passes the cheap check but has no quantization table (DALI fails to decode)."""
    out, i = bytearray(jpeg[:2]), 2
    while jpeg[i + 1] != 0xDA:
        length = (jpeg[i + 2] << 8) | jpeg[i + 3]
        if jpeg[i + 1] != 0xDB:
            out += jpeg[i:i + 2 + length]
        i += 2 + length
    return bytes(out + jpeg[i:])


def test_corrupt_files_are_replaced_and_counted(tmp_path):
    data = write_image_folder(tmp_path / "data", classes=2, per_class=6, size=(40, 32))
    good = (data / "class_0" / "img_0.jpg").read_bytes()
    bad = {data / "class_0" / "img_1.jpg": good[:len(good) // 2],                       # truncated
           data / "class_0" / "zz_garbage.jpg": os.urandom(3000),                        # not an image
           data / "class_1" / "img_3.jpg": b"",                                          # empty
           data / "class_1" / "img_4.jpg": _no_quant_table((data / "class_1" / "img_4.jpg").read_bytes())}
    for path, payload in bad.items():
        path.write_bytes(payload)
    loader = DALILoader(data, SMALL, batch_size=4, num_workers=1, seed=0, drop_last=False)
    assert len(loader) == 4  # 13 images
    for epoch in range(2):
        batches = collect(loader, epoch)
        assert len(batches) == 4 and sum(len(b) for b in batches) == 13
        assert sorted(torch.cat([b.indices for b in batches]).tolist()) == list(range(13))
        for b in batches:
            assert all(torch.isfinite(v).all() for v in b.views)
        assert sum(b.num_bad for b in batches) == 4
        assert {p for b in batches for p in b.bad_paths} == {str(p) for p in bad}
    assert loader.num_bad == 8
    assert set(loader.bad_paths) == {str(p) for p in bad}


def test_a_folder_of_bad_files_is_a_data_error(tmp_path):
    for c in range(2):
        (tmp_path / "data" / f"c{c}").mkdir(parents=True)
        for i in range(10):
            (tmp_path / "data" / f"c{c}" / f"{i}.jpg").write_bytes(os.urandom(200))
    loader = DALILoader(tmp_path / "data", SMALL, batch_size=4, num_workers=1)
    with pytest.raises(DataError, match="consecutive unreadable images"):
        list(loader)


def test_bad_settings_are_config_errors(jpeg_folder):
    with pytest.raises(ConfigError, match="hw_decoder_load"):
        DALILoader(jpeg_folder, SMALL, batch_size=4, hw_decoder_load=1.5)
    with pytest.raises(ConfigError, match="prefetch"):
        DALILoader(jpeg_folder, SMALL, batch_size=4, prefetch=0)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA"):
            DALILoader(jpeg_folder, SMALL, batch_size=4, device="cuda")


def test_truncated_tfrecord_shard_is_skipped_and_counted(jpeg_folder, tmp_path):
    tf_dir = write_tfrecord_split(jpeg_folder, tmp_path / "tf")
    shard = tf_dir / "train-00001.tfrecord"
    shard.write_bytes(shard.read_bytes()[:-300])  # the last record is cut
    loader = DALILoader(tf_dir, SMALL, batch_size=6, num_workers=1, seed=0, drop_last=False)
    batches = collect(loader)
    assert sum(b.num_bad for b in batches) == 1
    assert batches[0].bad_paths + batches[1].bad_paths + batches[2].bad_paths + batches[3].bad_paths == \
        [f"{shard}#11"]


# -- integration ----------------------------------------------------------------------------------
def test_build_without_dali_is_a_clear_error(jpeg_folder):
    code = ("import sys; sys.modules['nvidia.dali'] = None\n"
            "import pipelines, pipelines.dali_backend as d\n"
            "from swav_fast.errors import ConfigError\n"
            "assert not d.dali_available()\n"
            "try:\n"
            f"    d.DALILoader({str(jpeg_folder)!r}, pipelines.MultiCropSpec(), 2)\n"
            "except ConfigError as e:\n"
            "    print('ConfigError:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pip install -e '.[dali]'" in out.stdout


def test_train_with_the_dali_loader(tmp_path):
    from swav_fast.cli import main
    from swav_fast.runlog import read_log

    data = write_image_folder(tmp_path / "data", per_class=8)
    rc = main(["train", "--loader", "dali", "--data", str(data), "--output", str(tmp_path / "run"),
               "--max-steps", "3", "--no-progress", "model.arch=resnet18", "model.hidden_dim=32",
               "model.feat_dim=16", "model.num_prototypes=20", "data.crops.num_crops=[2, 2]",
               "data.crops.size_crops=[32, 16]", "data.crops.min_scale_crops=[0.3, 0.1]",
               "data.crops.max_scale_crops=[1.0, 0.3]", "data.workers=1", "optim.batch_size=8",
               "optim.epochs=2",
               "optim.warmup_epochs=0.5", "methods.swav.freeze_prototypes_niters=2", "eval.at_end=false",
               "train.log_every=1"])
    assert rc == 0
    steps = [r for r in read_log(tmp_path / "run") if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in steps)


# -- GPU ----------------------------------------------------------------------------------------
@pytest.mark.gpu
@needs_dali  # skips where DALI is not installed; where it is, a broken DALI fails
def test_gpu_mixed_decoding_matches_the_cpu_path(jpeg_folder):
    spec = SMALL.replace(dtype="bfloat16", channels_last=True)
    gpu = DALILoader(jpeg_folder, spec, batch_size=6, device="cuda", num_workers=2, seed=4,
                     hw_decoder_load=0.5)
    cpu = DALILoader(jpeg_folder, spec, batch_size=6, device="cpu", num_workers=2, seed=4)
    for x, y in zip(collect(gpu), collect(cpu)):
        assert torch.equal(x.indices.cpu(), y.indices) and torch.equal(x.labels.cpu(), y.labels)
        for u, w in zip(x.views, y.views):
            assert u.device.type == "cuda" and u.dtype == torch.bfloat16 and u.shape == w.shape
            assert u.is_contiguous(memory_format=torch.channels_last)
            # nvJPEG vs libjpeg-turbo and GPU vs CPU resampling differ by a few levels; the draws are equal
            assert (u.float().cpu() - w.float()).abs().mean() < 0.1


@pytest.mark.gpu
@needs_dali
def test_gpu_corrupt_files_are_replaced_and_counted(tmp_path):
    data = write_image_folder(tmp_path / "data", classes=2, per_class=6, size=(40, 32))
    good = (data / "class_0" / "img_0.jpg").read_bytes()
    bad = {data / "class_0" / "img_1.jpg": good[:len(good) // 2],
           data / "class_1" / "img_4.jpg": _no_quant_table((data / "class_1" / "img_4.jpg").read_bytes())}
    for path, payload in bad.items():
        path.write_bytes(payload)
    loader = DALILoader(data, SMALL, batch_size=4, device="cuda", num_workers=2, drop_last=False)
    batches = collect(loader)
    assert sum(len(b) for b in batches) == 12 and sum(b.num_bad for b in batches) == 2
    assert {p for b in batches for p in b.bad_paths} == {str(p) for p in bad}
    assert all(v.device.type == "cuda" and torch.isfinite(v).all() for b in batches for v in b.views)
