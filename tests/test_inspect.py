"""swav-fast inspect: a clean dataset passes; truncation, bad indexes and count mismatches fail."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from swav_fast.cli import main
from swav_fast.errors import DataError
from swav_fast.prepare import inspect_dataset, prepare_dataset
from tests.test_prepare import make_source

FORMATS = ("tfrecord", "wds", "beton")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("inspect")
    src = make_source(base / "src", per_class=3)
    return {
        fmt: Path(
            prepare_dataset(src, base / fmt, fmt, shard_size=5, workers=1, progress=False) and base / fmt
        )
        for fmt in FORMATS
    }


def copy_split(prepared: dict[str, Path], fmt: str, dst: Path) -> Path:
    """A private copy of a prepared --out folder (tests corrupt it)."""
    out = dst / fmt
    for p in (prepared[fmt] / "train").iterdir():
        (out / "train").mkdir(parents=True, exist_ok=True)
        (out / "train" / p.name).write_bytes(p.read_bytes())
    return out


def edit_manifest(split: Path, fn) -> None:
    path = split / "manifest.json"
    m = json.loads(path.read_text())
    fn(m)
    path.write_text(json.dumps(m))


def problems(path: Path, **kw) -> str:
    with pytest.raises(DataError) as e:
        inspect_dataset(path, **kw)
    return str(e.value)


@pytest.mark.parametrize("fmt", FORMATS)
def test_clean_dataset_passes(prepared: dict[str, Path], fmt: str) -> None:
    (rep,) = inspect_dataset(prepared[fmt], checksums=True, deep=True, samples=3)
    assert rep.ok and rep.format == fmt and rep.num_samples == 15 and not rep.warnings
    assert rep.samples_decoded == (3 if fmt == "beton" else 3 * 3)  # 3 per shard
    # the split folder and the manifest path are accepted too
    assert inspect_dataset(prepared[fmt] / "train")[0].ok
    assert inspect_dataset(prepared[fmt] / "train" / "manifest.json")[0].ok


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_shard(prepared: dict[str, Path], tmp_path: Path, fmt: str) -> None:
    out = copy_split(prepared, fmt, tmp_path)
    shard = sorted(p for p in (out / "train").iterdir() if p.suffix in (".tfrecord", ".tar", ".beton"))[0]
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    msg = problems(out)
    assert shard.name in msg and "truncated" in msg
    # even when the manifest is edited to the new size, the structure check catches it
    edit_manifest(
        out / "train", lambda m: [s.update(bytes=size // 2) for s in m["shards"] if s["path"] == shard.name]
    )
    msg = problems(out)
    assert shard.name in msg and "truncated" in msg


@pytest.mark.parametrize("fmt", ["tfrecord", "wds"])
def test_missing_and_inconsistent_index(prepared: dict[str, Path], tmp_path: Path, fmt: str) -> None:
    out = copy_split(prepared, fmt, tmp_path)
    os.unlink(out / "train" / "train-00001.idx")
    assert "index train-00001.idx is missing" in problems(out)
    # an index of the right size whose entries are out of order
    idx = out / "train" / "train-00000.idx"
    text = idx.read_text()
    lines = text.splitlines()
    k = 0 if fmt == "tfrecord" else 1  # wds: line 0 is the version header
    lines[k], lines[k + 1] = lines[k + 1], lines[k]
    idx.write_text("\n".join(lines) + "\n")
    assert idx.stat().st_size == len(text)
    assert "index train-00000.idx does not match" in problems(out)


@pytest.mark.parametrize("fmt", FORMATS)
def test_count_mismatch(prepared: dict[str, Path], tmp_path: Path, fmt: str) -> None:
    out = copy_split(prepared, fmt, tmp_path)

    def one_more(m):  # consistent manifest totals, but the first shard does not hold that many samples
        m["shards"][0]["num_samples"] += 1
        m["num_samples"] += 1
        m["counts_per_class"][m["classes"][0]] += 1

    edit_manifest(out / "train", one_more)
    msg = problems(out)
    assert "the manifest says" in msg and ("16" in msg or "6" in msg)


@pytest.mark.parametrize("fmt", FORMATS)
def test_class_count_mismatch_needs_labels(prepared: dict[str, Path], tmp_path: Path, fmt: str) -> None:
    out = copy_split(prepared, fmt, tmp_path)

    def swap(m):  # totals still agree, per-class counts do not
        m["counts_per_class"]["class_0"] -= 1
        m["counts_per_class"]["class_1"] += 1

    edit_manifest(out / "train", swap)
    msg = problems(out, deep=True)
    assert "class 'class_0'" in msg and "class 'class_1'" in msg


def test_inconsistent_manifest_and_undecodable_sample(prepared: dict[str, Path], tmp_path: Path) -> None:
    out = copy_split(prepared, "wds", tmp_path)
    edit_manifest(out / "train", lambda m: m.update(num_samples=m["num_samples"] + 1))
    assert "shards hold 15 samples but num_samples is 16" in problems(out)
    out = copy_split(prepared, "wds", tmp_path / "b")
    tar = out / "train" / "train-00000.tar"
    data = bytearray(tar.read_bytes())
    data[512 + 2:512 + 400] = b"\x00" * 398  # wipe the first JPEG's headers (same size)
    tar.write_bytes(bytes(data))
    assert "does not decode" in problems(out)


def test_cli_exit_codes(prepared: dict[str, Path], tmp_path: Path, capsys) -> None:
    assert main(["inspect", str(prepared["beton"])]) == 0
    assert "beton, 15 samples in 1 shard(s)" in capsys.readouterr().out
    out = copy_split(prepared, "tfrecord", tmp_path)
    os.unlink(out / "train" / "train-00002.tfrecord")
    assert main(["inspect", str(out)]) == 2
    err = capsys.readouterr().err
    assert "swav-fast inspect: error:" in err and "shard train-00002.tfrecord is missing" in err
    assert main(["inspect", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err
