"""The CLI on bad input: a clear one-line error naming the problem, a non-zero exit, nothing lost."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from swav_fast.cli import main
from tests.helpers import write_image_folder

TINY = ["model.arch=resnet10_half", "model.hidden_dim=32", "model.feat_dim=16", "model.num_prototypes=20",
        "data.crops.num_crops=[2, 2]", "data.crops.size_crops=[32, 16]", "data.crops.min_scale_crops=[0.14, 0.05]",
        "data.crops.max_scale_crops=[1.0, 0.14]", "data.workers=0",
        "optim.batch_size=8", "optim.epochs=1", "optim.warmup_epochs=0", "eval.at_end=false"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "swav_fast", *args], capture_output=True, text=True,
                          timeout=600)


def test_help_for_every_subcommand():
    for sub in ("synth", "train", "eval"):
        with pytest.raises(SystemExit) as e:
            main([sub, "--help"])
        assert e.value.code == 0
    with pytest.raises(SystemExit):
        main(["eval", "knn", "--help"])


def test_missing_data_folder(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "nope"), "--output", str(tmp_path / "run"), *TINY]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "not found" in err


def test_empty_data_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["train", "--data", str(tmp_path / "empty"), "--output", str(tmp_path / "run"), *TINY]) == 2
    assert "empty" in capsys.readouterr().err


def test_unknown_config_key_lists_valid_keys(tmp_path, capsys):
    assert main(["train", "--output", str(tmp_path / "run"), "optim.lr=0.1"]) == 2
    err = capsys.readouterr().err
    assert "optim.lr" in err and "base_lr" in err and "weight_decay" in err
    assert not (tmp_path / "run").exists()  # rejected before any work


def test_unwritable_output_folder_keeps_existing_file(tmp_path, capsys):
    data = write_image_folder(tmp_path / "data")
    blocker = tmp_path / "results"
    blocker.write_text("precious")  # a file where the run folder's parent should be
    code = main(["train", "--data", str(data), "--output", str(blocker / "run"), *TINY])
    assert code == 2
    assert "not writable" in capsys.readouterr().err
    assert blocker.read_text() == "precious"


def test_corrupt_images_are_skipped_and_counted(tmp_path):
    data = write_image_folder(tmp_path / "data")
    (data / "class_0" / "zero.jpg").write_bytes(b"")
    good = (data / "class_1" / "img_0.jpg").read_bytes()
    (data / "class_1" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (data / "class_2" / "text.jpg").write_text("not an image")
    out = tmp_path / "run"
    proc = run_cli("train", "--data", str(data), "--output", str(out), "--no-progress", *TINY,
                   "optim.epochs=2")
    assert proc.returncode == 0, proc.stderr
    assert "skipped 6 unreadable image(s)" in proc.stdout  # 3 bad files x 2 epochs
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["kind"] == "done" and records[-1]["bad_images"] == 6


def test_eval_knn_json(tmp_path):
    data = write_image_folder(tmp_path / "data" / "train")
    write_image_folder(tmp_path / "data" / "val", per_class=3, seed=1)
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--output", str(out), "--no-progress", *TINY]) == 0
    ckpt = sorted((out / "checkpoints").glob("ckpt-*.pt"))[-1]
    proc = run_cli("eval", "knn", "--checkpoint", str(ckpt), "--data", str(tmp_path / "data"), "--json",
                   "--image-size", "32")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["num_train"] == 24 and result["num_val"] == 9 and 0 <= result["top1"] <= 100


def test_eval_refuses_foreign_checkpoint(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 not really a checkpoint")
    (tmp_path / "d" / "train").mkdir(parents=True)
    assert main(["eval", "knn", "--checkpoint", str(bad), "--data", str(tmp_path / "d")]) == 2
    assert "bad.pt" in capsys.readouterr().err
