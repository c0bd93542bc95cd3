"""build_loader: batches, sharding, epochs, exact resume, formats, bad files, errors."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import MultiCropBatch, MultiCropSpec, build_loader, register_backend, scan_image_folder
from pipelines.loader import PILLoader, available_backends
from swav_fast.errors import ConfigError, DataError

SPEC = MultiCropSpec(num_crops=[2, 2], size_crops=[32, 16])


def write_jpeg(path: Path, w: int = 40, h: int = 30, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, quality=90)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    for c in range(3):
        for k in range(4):
            write_jpeg(root / f"c{c}" / f"{k}.jpg", seed=10 * c + k)
    return root  # 12 images


def _collect(loader) -> list[MultiCropBatch]:
    return list(loader)


def test_batches_shapes_and_len(folder: Path) -> None:
    loader = build_loader(folder, SPEC, batch_size=4)
    assert len(loader) == 3 and loader.num_samples == 12 and loader.dataset_size == 12
    assert loader.classes == ["c0", "c1", "c2"]
    batches = _collect(loader)
    assert len(batches) == 3
    for b in batches:
        assert [tuple(v.shape) for v in b.views] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 2
        assert all(v.dtype == torch.float32 and v.is_contiguous() for v in b.views)
        assert b.labels.dtype == torch.int64 and b.indices.dtype == torch.int64 and b.num_bad == 0
        assert torch.equal(b.labels, b.indices // 4)
    assert sorted(torch.cat([b.indices for b in batches]).tolist()) == list(range(12))
    assert loader.num_bad == 0


def test_drop_last_false_partial_batch(folder: Path) -> None:
    loader = build_loader(folder, SPEC, batch_size=5, drop_last=False)
    assert len(loader) == 3
    assert [len(b) for b in loader] == [5, 5, 2]
    assert len(build_loader(folder, SPEC, batch_size=5)) == 2


@pytest.mark.parametrize("world_size", [2, 3, 5])
def test_ranks_disjoint_and_covering(folder: Path, world_size: int) -> None:
    index = scan_image_folder(folder)
    # drop_last: truncated to a multiple of world_size, strictly disjoint, equal sizes
    shards = [build_loader(index, SPEC, 1, rank=r, world_size=world_size, seed=3).epoch_indices(2)
              for r in range(world_size)]
    assert len({len(s) for s in shards}) == 1
    flat = np.concatenate(shards)
    assert len(set(flat.tolist())) == len(flat) == 12 // world_size * world_size
    # no drop_last: padded, jointly covering every sample, duplicates only from padding
    loaders = [build_loader(index, SPEC, 2, rank=r, world_size=world_size, seed=3, drop_last=False)
               for r in range(world_size)]
    shards = [ld.epoch_indices(2) for ld in loaders]
    assert len({len(s) for s in shards}) == 1 and len({len(ld) for ld in loaders}) == 1
    flat = np.concatenate(shards)
    assert set(flat.tolist()) == set(range(12))
    assert len(flat) - 12 == (-12) % world_size


def test_ranks_iterate_their_shard(folder: Path) -> None:
    index = scan_image_folder(folder)
    seen = []
    for r in range(2):
        loader = build_loader(index, SPEC, batch_size=3, rank=r, world_size=2, seed=1)
        loader.set_epoch(4)
        got = torch.cat([b.indices for b in loader]).tolist()
        assert got == loader.epoch_indices().tolist()
        seen += got
    assert sorted(seen) == list(range(12))


def test_shuffle_per_epoch_and_seed(folder: Path) -> None:
    index = scan_image_folder(folder)
    a = build_loader(index, SPEC, 4, seed=0)
    b = build_loader(index, SPEC, 4, seed=0)
    c = build_loader(index, SPEC, 4, seed=1)
    assert np.array_equal(a.epoch_indices(0), b.epoch_indices(0))
    assert not np.array_equal(a.epoch_indices(0), a.epoch_indices(1))
    assert not np.array_equal(a.epoch_indices(0), c.epoch_indices(0))
    e0 = torch.cat([x.indices for x in a]).tolist()
    a.set_epoch(1)
    e1 = torch.cat([x.indices for x in a]).tolist()
    assert e0 != e1 and sorted(e0) == sorted(e1)
    assert e0 == torch.cat([x.indices for x in b]).tolist()


def test_start_batch_resumes_exactly(folder: Path) -> None:
    loader = build_loader(folder, SPEC, batch_size=3, seed=2)
    loader.set_epoch(1)
    full = _collect(loader)
    assert len(full) == 4
    calls: list[int] = []
    decode = loader.dataset._decode
    loader.dataset._decode = lambda j: calls.append(j) or decode(j)  # type: ignore[method-assign]
    loader.set_epoch(1, start_batch=2)
    rest = _collect(loader)
    assert len(rest) == 2 and len(calls) == 6  # skipped batches are never decoded
    for x, y in zip(full[2:], rest):
        assert torch.equal(x.indices, y.indices) and torch.equal(x.labels, y.labels)
        assert all(torch.equal(u, v) for u, v in zip(x.views, y.views))
    loader.set_epoch(1, start_batch=len(loader))
    assert _collect(loader) == []
    with pytest.raises(ConfigError, match="start_batch"):
        loader.set_epoch(1, start_batch=5)


def test_workers_match_in_process_and_follow_epochs(folder: Path) -> None:
    index = scan_image_folder(folder)
    spec = SPEC.replace(dtype="bfloat16", channels_last=True)
    ref = build_loader(index, spec, batch_size=4, seed=9)
    par = build_loader(index, spec, batch_size=4, seed=9, num_workers=2)
    try:
        for epoch, start in [(0, 0), (1, 1), (2, 0)]:  # persistent workers must see every epoch
            ref.set_epoch(epoch, start)
            par.set_epoch(epoch, start)
            for x, y in zip(_collect(ref), _collect(par), strict=True):
                assert torch.equal(x.indices, y.indices)
                for u, v in zip(x.views, y.views):
                    assert v.dtype == torch.bfloat16 and v.is_contiguous(memory_format=torch.channels_last)
                    assert torch.equal(u, v)
        par.set_epoch(3)
        first = next(iter(par))  # abandon an epoch mid-way, then resume it elsewhere
        par.set_epoch(3, start_batch=1)
        rest = _collect(par)
        ref.set_epoch(3)
        assert [b.indices.tolist() for b in _collect(ref)] == [b.indices.tolist() for b in [first, *rest]]
    finally:
        par.close()


def test_memory_format_and_dtype(folder: Path) -> None:
    b = next(iter(build_loader(folder, SPEC.replace(channels_last=True, dtype="bfloat16"), 4)))
    for v in b.views:
        assert v.dtype == torch.bfloat16 and v.is_contiguous(memory_format=torch.channels_last)
        assert not v.is_contiguous()
    b16 = next(iter(build_loader(folder, SPEC.replace(dtype="float16"), 4)))
    assert all(v.dtype == torch.float16 and v.is_contiguous() for v in b16.views)
    b32 = next(iter(build_loader(folder, SPEC, 4)))
    assert all(torch.allclose(x.float(), y, atol=0.05) for x, y in zip(b.views, b32.views))


def test_corrupt_files_full_epoch(folder: Path) -> None:
    good = (folder / "c0" / "0.jpg").read_bytes()
    (folder / "c0" / "0a_empty.jpg").write_bytes(b"")
    (folder / "c1" / "0a_trunc.jpg").write_bytes(good[: len(good) // 2])
    (folder / "c2" / "0a_text.jpg").write_text("not an image")
    bad = {str(folder / "c0" / "0a_empty.jpg"), str(folder / "c1" / "0a_trunc.jpg"), str(folder / "c2" / "0a_text.jpg")}
    for workers in (0, 2):
        loader = build_loader(folder, SPEC, batch_size=5, num_workers=workers)
        try:
            assert loader.dataset_size == 15
            batches = _collect(loader)
            assert [len(b) for b in batches] == [5, 5, 5]
            assert sum(b.num_bad for b in batches) == 3 == loader.num_bad
            assert set(loader.bad_paths) == bad
            assert all(torch.isfinite(v.float()).all() for b in batches for v in b.views)
            _collect(loader)
            assert loader.num_bad == 6  # cumulative
        finally:
            loader.close()


def test_unknown_backend_and_bad_args(folder: Path) -> None:
    with pytest.raises(ConfigError, match="pil"):
        build_loader(folder, SPEC, 4, backend="nope")
    with pytest.raises(ConfigError, match="rank"):
        build_loader(folder, SPEC, 4, rank=2, world_size=2)
    with pytest.raises(ConfigError, match="batch_size"):
        build_loader(folder, SPEC, 0)
    with pytest.raises(ConfigError, match="batch_size"):
        build_loader(folder, SPEC, 13)


def test_register_backend(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines.loader import BACKENDS

    BACKENDS.names()  # the built-in ones registered; "test-pil" is removed afterwards (other tests list
    monkeypatch.setattr(BACKENDS, "_entries", dict(BACKENDS._entries))  # the backends reading a format)
    monkeypatch.setattr(BACKENDS, "_meta", dict(BACKENDS._meta))
    made = []

    def factory(index, spec, batch_size, **kw):
        made.append(kw)
        return PILLoader(index, spec, batch_size, **kw)

    register_backend("test-pil", factory)
    assert "test-pil" in available_backends()
    loader = build_loader(folder, SPEC, 4, backend="test-pil", seed=4)
    assert made and made[0]["seed"] == 4 and len(loader) == 3


def test_folder_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(DataError, match=re.escape(str(missing))):
        build_loader(missing, SPEC, 4)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=re.escape(str(empty))):
        build_loader(empty, SPEC, 4)
    (empty / "cls").mkdir()
    (empty / "cls" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="no images"):
        build_loader(empty, SPEC, 4)
    afile = tmp_path / "file.jpg"
    afile.write_bytes(b"")
    with pytest.raises(DataError, match="not a folder"):
        build_loader(afile, SPEC, 4)


def test_scan_image_folder(tmp_path: Path) -> None:
    for rel in ["b/x.JPG", "b/sub/y.png", "a/z.jpeg", "a/w.webp", "a/v.bmp", "a/.hidden.jpg", "a/skip.txt",
                "a-b/q.jpg", ".git/obj.jpg"]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    idx = scan_image_folder(tmp_path)
    assert idx.classes == ["a", "a-b", "b"]
    assert idx.samples == [("a/v.bmp", 0), ("a/w.webp", 0), ("a/z.jpeg", 0), ("a-b/q.jpg", 1),
                           ("b/sub/y.png", 2), ("b/x.JPG", 2)]
    assert idx.path(0) == str(tmp_path / "a" / "v.bmp") and idx.label(5) == 2 and len(idx) == 6
