"""What a run says: the start-of-run block, progress text, end-of-run lines, eval progress bars, and
the small wording fixes of issue 21 (eval linear's folder error, export's arch error, bench table)."""
from __future__ import annotations

import types

import pytest

from swav_fast.runinfo import (CLEAR_GAIN, describe_run, distinct_bad_files, eta_text, knn_plan,
                               knn_result_line, learning_hint, progress_desc, step_mode_line)
from tests.helpers import tiny_config, write_image_folder

KNN = {"k": 20, "temperature": 0.07, "num_train": 2000, "num_val": 500, "num_classes": 10,
       "trained_top1": 64.4, "random_init_top1": 38.4}


def test_progress_text_and_eta():
    assert progress_desc(0, 24) == "epoch 1/24" and progress_desc(23, 24) == "epoch 24/24"
    assert eta_text(0, 0.0, 100) == "?"
    assert eta_text(10, 5.0, 100) == "0m50s"  # 0.5 s per step
    assert eta_text(10, 100.0, 744) == "2h04m"  # 7440 s
    assert eta_text(5, 1.0, 0) == "0m00s"


def test_knn_lines_say_chance_and_random_init():
    line = knn_result_line(KNN)
    assert "trained 64.40% vs random init 38.40%" in line
    assert "chance 1/10 = 10.00%" in line and "random-init trunk already beats chance" in line
    assert knn_plan(False, None, True) == "off (eval.at_end=false)"
    skipped = knn_plan(True, None, True)
    assert skipped.startswith("skipped: --data was given without eval.knn_data") and "eval.knn_data=" in skipped
    assert "on /" in knn_plan(True, "some/folder", True)


def test_learning_hint_only_when_training_did_not_clearly_beat_random_init():
    assert learning_hint(KNN) is None  # +26 points: no hint
    assert learning_hint({**KNN, "trained_top1": 38.4 + CLEAR_GAIN}) is None  # exactly the margin
    worse = learning_hint({**KNN, "trained_top1": 17.3, "random_init_top1": 33.5})  # issue 22's seed 1
    assert worse.startswith("hint: the trained trunk did WORSE than its random initialisation (-16.20 points")
    assert "train.seed" in worse and "swav-fast bench learning" in worse and "optim.base_lr" in worse
    unclear = learning_hint({**KNN, "trained_top1": 40.0})
    assert "was not clearly better than" in unclear and "(+1.60 points" in unclear
    assert learning_hint({**KNN, "trained_top1": 40.0}, margin=1.0) is None


def test_train_command_prints_the_hint_below_random_init(monkeypatch, capsys):
    from swav_fast.cli import main
    from swav_fast.train import TrainResult

    def fake_train(knn):
        return lambda cfg, resume=None, overwrite=False: TrainResult(
            run_dir="r", steps=1, epochs=1, seconds=1.0, images_per_s=1.0, last_loss=1.0, knn=knn)

    for knn, shown in (({**KNN, "trained_top1": 17.3, "random_init_top1": 33.5}, True), (KNN, False)):
        monkeypatch.setattr("swav_fast.train.train", fake_train(knn))
        assert main(["train", "--no-progress"]) == 0
        out = capsys.readouterr().out
        assert f"trained {knn['trained_top1']:.2f}% vs random init" in out
        assert ("hint: the trained trunk did WORSE" in out) is shown, out


def test_step_mode_line_says_why():
    assert step_mode_line("eager", "eager", None).startswith("eager (train.step_mode=eager: plain PyTorch")
    assert step_mode_line("graph", "compile", "no CUDA") == \
        "compile (train.step_mode=graph is not possible here: no CUDA)"


def test_distinct_bad_files_counts_files_not_events():
    loader = types.SimpleNamespace(bad_paths=["a.jpg", "b.jpg", "a.jpg", "b.jpg", "c.jpg", "a.jpg"], num_bad=6)
    assert distinct_bad_files(loader) == 3
    assert distinct_bad_files(types.SimpleNamespace(bad_paths=[], num_bad=2)) == 2  # no paths reported


def test_start_block_of_a_trainer(tmp_path):
    data = write_image_folder(tmp_path / "data")
    out = tmp_path / "run"
    from swav_fast.train import Trainer

    trainer = Trainer(tiny_config(data, out, "eval.at_end=true", "train.threads=1", "train.max_steps=2",
                                  "train.checkpoint_every_steps=5"))
    try:
        block = dict(line.split(":", 1) for line in describe_run(trainer))
    finally:
        trainer.close()
    block = {k: v.strip() for k, v in block.items()}
    assert block["run folder"] == str(out.resolve())
    assert block["data"] == f"{data.resolve()}: 24 images, 3 classes"
    assert block["device"] == "cpu (train.device=auto)" or block["device"].startswith("cuda")
    assert block["loader"].startswith("pil with 0 worker(s)")
    assert block["CPU threads"].startswith("1 (train.threads=1")
    assert block["batch"] == "8 images, 4 views each"
    assert block["steps"] == "6 (2 epochs x 3 steps); this run: step 0 -> 2 (train.max_steps=2; the schedule " \
                             "is unchanged)"
    assert block["checkpoints"] == f"{out.resolve() / 'checkpoints'} (every 1 epoch(s), every 5 steps, at the " \
                                   "end; newest 3 kept)"
    assert block["metrics"] == str(out.resolve() / "metrics.jsonl")
    assert block["end-of-run kNN"].startswith("skipped: --data was given without eval.knn_data")


def _fake_result(**kw):
    from swav_fast.train import TrainResult

    return TrainResult(run_dir="r", steps=6, epochs=2, seconds=1.0, images_per_s=48.0, last_loss=3.0, **kw)


@pytest.mark.parametrize("overrides, knn, expected", [
    (["eval.at_end=true"], {}, "end-of-run kNN skipped: --data was given without eval.knn_data"),
    (["eval.at_end=true"], KNN, "chance 1/10 = 10.00%"),
    (["eval.at_end=false"], {}, None),
])
def test_train_command_end_lines(tmp_path, monkeypatch, capsys, overrides, knn, expected):
    import swav_fast.train
    from swav_fast.cli import main

    monkeypatch.setattr(swav_fast.train, "train", lambda cfg, resume=None, overwrite=False: _fake_result(knn=knn))
    assert main(["train", "--data", str(tmp_path), "--output", str(tmp_path / "run"), *overrides]) == 0
    printed = capsys.readouterr().out
    if expected:
        assert expected in printed
    else:
        assert "kNN" not in printed


def test_eval_progress_bars(tmp_path, capsys):
    import torch

    from swav_fast.eval.knn import extract_features, knn_eval
    from swav_fast.eval.linear import linear_probe

    write_image_folder(tmp_path / "d" / "train", per_class=2)
    write_image_folder(tmp_path / "d" / "val", per_class=1, seed=1)
    trunk = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    extract_features(trunk, tmp_path / "d" / "train", image_size=16, batch_size=2)
    assert "features train" not in capsys.readouterr().err  # off by default (library use)
    knn_eval(trunk, tmp_path / "d", image_size=16, batch_size=2, progress=True)
    err = capsys.readouterr().err
    assert "features train" in err and "/3 " in err and "features val" in err and "/2 " in err  # batches
    linear_probe(trunk, tmp_path / "d", image_size=16, epochs=2, progress=True)
    err = capsys.readouterr().err
    assert "linear probe" in err and "/2 " in err  # epochs


def test_eval_linear_error_names_its_folder(tmp_path):
    import torch

    from swav_fast.errors import DataError
    from swav_fast.eval.linear import load_features

    with pytest.raises(DataError, match=r"^linear probe data folder .*nope does not exist$"):
        load_features(torch.nn.Identity(), tmp_path / "nope")
    (tmp_path / "half" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match=r"^linear probe data folder .*half must contain train/ and val/"):
        load_features(torch.nn.Identity(), tmp_path / "half")


def test_export_error_names_the_exportable_archs():
    from swav_fast.export import EXPORTABLE_ARCHS, ExportError, reference_shapes

    with pytest.raises(ExportError) as e:
        reference_shapes("resnet10_half")
    msg = str(e.value)
    assert "resnet10_half" in msg and "cannot be exported" in msg and "\n" not in msg
    assert all(arch in msg for arch in EXPORTABLE_ARCHS)


def test_bench_table_note_column_is_not_padded():
    from benchmarks.common import format_table

    long_note = "unavailable: ImportError: " + "x" * 200  # kept whole
    table = format_table([{"b": "pil", "v": 1.5, "note": "short"}, {"b": "ffcv", "v": 100.0, "note": long_note}],
                         [("b", "backend"), ("v", "images/s"), ("note", "note")]).splitlines()
    assert table[2].endswith("  short") and table[3].endswith(long_note)
    assert not any(line.endswith(" ") for line in table)
