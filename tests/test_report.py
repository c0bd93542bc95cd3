"""``swav-fast report``: PNG curves and a summary table from a run folder's metrics.jsonl."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from swav_fast.cli import main
from swav_fast.report import summarize, write_report
from swav_fast.runlog import read_log
from swav_fast.train import train
from tests.helpers import tiny_config, write_image_folder

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _check_png(path):
    data = path.read_bytes()
    assert len(data) > 2000 and data.startswith(PNG_MAGIC), path  # a real, non-blank plot
    with Image.open(path) as img:
        assert img.size[0] >= 300 and img.size[1] >= 200
        assert len(img.convert("L").getcolors(1 << 16) or ()) > 2  # more than a background


def test_report_of_a_short_run(tmp_path, capsys):
    data = write_image_folder(tmp_path / "data" / "train")
    write_image_folder(tmp_path / "data" / "val", per_class=3, seed=1)
    run = tmp_path / "run"
    train(tiny_config(data, run, "model.arch=resnet10_half", "eval.at_end=true",
                      f"eval.knn_data={tmp_path / 'data'}", "eval.image_size=32"))  # 2 epochs x 3 steps
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert "| steps | 6 |" in out and "| epochs completed | 2 |" in out and "kNN top-1 (%)" in out
    report = run / "report"
    for name in ("loss", "lr", "images_per_s", "loader_wait", "knn", "overview"):
        _check_png(report / f"{name}.png")
    assert not [p for p in report.iterdir() if p.name.endswith(".tmp")]
    summary = json.loads((report / "summary.json").read_text())
    records = read_log(run)
    done = records[-1]
    assert summary["status"] == "finished" and summary["steps"] == 6 and summary["epochs"] == 2
    assert summary["final_loss"] == pytest.approx([r for r in records if r["kind"] == "step"][-1]["loss"])
    knn = next(r for r in records if r["kind"] == "knn")
    assert summary["knn_top1"] == knn["trained_top1"]
    assert summary["run_images_per_s"] == done["images_per_s"]
    assert (report / "summary.md").read_text().startswith("# swav-fast run")

    assert main(["report", str(run), "--out", str(tmp_path / "elsewhere"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["plots"]) == 6 and result["summary"]["steps"] == 6


def _write_log(run, records, tail=""):
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def test_resumed_run_periodic_knn_and_loader_wait(tmp_path):
    steps = [{"kind": "step", "step": s, "epoch": (s - 1) // 4, "loss": 8.0 - s * 0.1, "lr": 0.1 * s,
              "images_per_s": 100.0, "loader_wait_fraction": 0.5, "bad_images": 0} for s in range(1, 7)]
    crashed_tail = [{**r, "loss": 99.0, "images_per_s": 1.0} for r in steps[4:]]  # logged, then lost
    records = (steps[:4] + crashed_tail + [{"kind": "resume", "step": 4, "epoch": 1}] + steps[4:]
               + [{"kind": "knn", "step": 4, "epoch": 1, "periodic": True, "top1": 40.0},
                  {"kind": "knn", "step": 6, "epoch": 1, "periodic": True, "top1": 55.0}])
    run = tmp_path / "run"
    _write_log(run, records, tail='{"kind": "step", "step": 7, "lo')  # a crash mid-line
    report = write_report(run)
    s = report.summary
    assert s["status"].startswith("incomplete") and s["steps"] == 6 and s["logged_steps"] == 6
    assert s["final_loss"] == pytest.approx(7.4)  # the resumed run's step 6, not the lost 99.0
    assert s["mean_images_per_s"] == pytest.approx(100.0)
    assert s["mean_loader_wait_fraction"] == pytest.approx(0.5)
    assert s["resumes"] == 1 and s["unreadable_lines"] == 1
    assert s["knn_periodic_last_top1"] == 55.0 and s["knn_periodic_best_top1"] == 55.0
    assert "knn_top1" not in s
    names = sorted(p.rsplit("/", 1)[-1] for p in report.plots)
    assert names == ["images_per_s.png", "knn.png", "loader_wait.png", "loss.png", "lr.png", "overview.png"]
    for p in report.plots:
        _check_png(tmp_path / "run" / "report" / p.rsplit("/", 1)[-1])
    assert "| mean loader wait fraction | 0.500 |" in report.markdown


def test_summary_without_steps_and_errors(tmp_path, capsys):
    assert summarize([{"kind": "resume", "step": 0}])["final_loss"] is None
    run = tmp_path / "run"
    _write_log(run, [{"kind": "resume", "step": 0, "epoch": 0}])
    assert main(["report", str(run)]) == 0
    assert "none" in capsys.readouterr().out and (run / "report" / "summary.md").is_file()

    assert main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "does not exist" in err and err.count("\n") == 1
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "metrics.jsonl" in capsys.readouterr().err
    _write_log(tmp_path / "junk", [], tail="not json\n")
    assert main(["report", str(tmp_path / "junk")]) == 2
    assert "no readable records" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["report", "--help"])
    assert e.value.code == 0
