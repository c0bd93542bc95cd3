"""CPU smoke tests of the step, Sinkhorn and end-to-end benchmarks: each ``main([...tiny...])`` runs,
prints its table and writes JSON with the documented keys (no timing assertions)."""
from __future__ import annotations

import json
import os

import pytest

import torch

from benchmarks import (bench_decode, bench_e2e, bench_loader, bench_methods, bench_prepare, bench_sinkhorn,
                        bench_step)
from swav_fast.cli import main as cli_main
from swav_fast.commands.bench import load
from swav_fast.errors import ConfigError
from swav_fast.methods import available_methods
from tests.helpers import write_image_folder

TINY_MODEL = ["--device", "cpu", "--arch", "resnet10_half", "--batch", "4", "--crops", "2x32,2x16",
              "--prototypes", "20", "--hidden-dim", "32", "--feat-dim", "16", "--steps", "2", "--warmup", "1",
              "--compile-backend", "eager"]
TINY_SINKHORN = ["--device", "cpu", "--rows", "48", "--prototypes", "30", "--views", "4",
                 "--loss-batch", "16", "--repeats", "2", "--warmup", "1", "--compile-backend", "eager"]


def _read(path) -> dict:
    data = json.loads(path.read_text())
    assert data["env"]["torch"] and "commit" in data["env"] and data["env"]["time_utc"]
    assert data["command"].startswith(f"python3 benchmarks/bench_{data['benchmark']}.py")
    return data


def test_bench_step(tmp_path, capsys):
    out = tmp_path / "step.json"
    assert bench_step.main([*TINY_MODEL, "--variants", "eager:fp32,plain-compile:fp32,graph:fp32",
                            "--queue", "8", "--json", str(out)]) == 0
    assert "images/s" in capsys.readouterr().out
    data = _read(out)
    assert data["benchmark"] == "step" and data["config"]["crops"] == [[2, 32], [2, 16]]
    rows = {r["variant"]: r for r in data["results"]}
    assert list(rows) == ["eager:fp32", "plain-compile:fp32", "graph:fp32"]
    for r in rows.values():
        assert r["images_per_s"] > 0 and r["step_ms"] > 0 and r["first_step_s"] > 0
        assert r["arch"] == "resnet10_half" and r["batch"] == 4 and r["peak_mem_gib"] is None
        assert r["loss"] == r["loss"]  # finite numbers, not NaN
    assert rows["eager:fp32"]["mode"] == "eager" and rows["eager:fp32"]["compile_s"] is None
    assert rows["plain-compile:fp32"]["compile_s"] > 0
    graph = rows["graph:fp32"]
    assert graph["mode"] == "compile" and "CUDA" in graph["fallback_reason"] and graph["captures"] == 0
    # compilation is reported apart from the run's wall time
    compiled = rows["plain-compile:fp32"]["compile_s"] + graph["compile_s"]
    assert data["compile_total_s"] == pytest.approx(compiled) and data["wall_s"] > compiled


def test_bench_step_both_layouts_on_the_cpu(tmp_path):
    out = tmp_path / "step.json"
    assert bench_step.main([*TINY_MODEL, "--variants", "eager:fp32", "--channels-last", "both",
                            "--json", str(out)]) == 0
    rows = _read(out)["results"]
    assert [(r["variant"], r["channels_last"]) for r in rows] == [("eager:fp32", False), ("eager:fp32", True)]
    # the same step in another memory layout: the same losses up to float32 summation order
    assert rows[1]["loss"] == pytest.approx(rows[0]["loss"], rel=1e-4) and rows[1]["step_ms"] > 0
    auto = bench_step.main([*TINY_MODEL, "--variants", "eager:fp32", "--json", str(out)])
    assert auto == 0 and _read(out)["results"][0]["channels_last"] is True  # the trainer's CPU default


def test_bench_methods_runs_every_method_through_the_trainer_step(tmp_path, capsys):
    out = tmp_path / "methods.json"
    assert cli_main(["bench", "methods", "--device", "cpu", "--batch", "4", "--crops", "2x32,2x16",
                     "--heads", "same", "--hidden-dim", "32", "--feat-dim", "16", "--bank-size", "64",
                     "--steps", "2", "--warmup", "1", "--json", str(out)]) == 0
    assert "x first" in capsys.readouterr().out
    data = _read(out)
    assert data["benchmark"] == "methods" and data["config"]["crops"] == [[2, 32], [2, 16]]
    rows = data["results"]
    assert [r["method"] for r in rows] == ["swav"] + [m for m in available_methods() if m != "swav"]
    for r in rows:
        assert "note" not in r, r
        assert r["variant"] == "eager:fp32" and r["mode"] == "eager" and r["images_per_s"] > 0
        assert (r["hidden_dim"], r["feat_dim"]) == (32, 16) and r["loss"] == r["loss"]
    assert rows[0]["ratio"] == 1.0
    assert rows[1]["ratio"] == pytest.approx(rows[1]["images_per_s"] / rows[0]["images_per_s"])


def test_bench_methods_paper_heads_cover_the_registry():
    assert set(bench_methods.PAPER_HEADS) == set(available_methods())


def test_bench_sinkhorn(tmp_path):
    out = tmp_path / "sinkhorn.json"
    assert bench_sinkhorn.main([*TINY_SINKHORN, "--json", str(out)]) == 0
    data = _read(out)
    assert data["benchmark"] == "sinkhorn" and data["config"]["copy_bandwidth_gbs"] > 0
    assert data["config"]["sets"] == 2 and data["config"]["timing"] == "wall clock"
    rows = {(r["problem"], r["mode"]): r for r in data["results"]}
    assert set(rows) == {(p, m) for p in ("sinkhorn", "sinkhorn+loss") for m in bench_sinkhorn.MODES}
    for (problem, mode), r in rows.items():
        assert r["floor_us"] > 0 and r["bytes"] > 0
        if mode == "graph":
            assert "CUDA" in r["note"] and "us_per_call" not in r
        else:
            assert r["us_per_call"] > 0 and r["x_floor"] > 0 and "note" not in r
    assert rows[("sinkhorn", "eager")]["bytes"] == 2 * 48 * 30 * 4
    assert rows[("sinkhorn+loss", "fused")]["shape"] == "4x16x30 + queue 32"


def test_sinkhorn_calls_rotate_through_the_input_sets():
    seen = []
    call = bench_sinkhorn.rotating_call(lambda x: seen.append(x["id"]), [{"id": i} for i in range(3)], "eager",
                                        torch.device("cpu"))
    assert bench_sinkhorn.time_per_call(call, torch.device("cpu"), 7) > 0
    assert seen == [0, 1, 2, 0, 1, 2, 0]


def test_sinkhorn_default_sets_cover_the_l2_cache():
    assert bench_sinkhorn.default_sets(torch.device("cpu"), 10**6) == 2
    args = bench_sinkhorn.parse_args(["--device", "cpu"])
    assert bench_sinkhorn.problem_bytes(args)["sinkhorn"] == 2 * 4096 * 3000 * 4  # 49 MB read, 49 written


def test_bench_loader_stages_and_workers(tmp_path, capsys):
    data_dir = write_image_folder(tmp_path / "data", per_class=4)
    out = tmp_path / "loader.json"
    assert bench_loader.main(["--data", str(data_dir), "--device", "cpu", "--backends", "pil,torch,dali",
                              "--batch-size", "4", "--batches", "1", "--warmup", "1", "--workers", "0",
                              "--json", str(out)]) == 0
    data = _read(out)
    rows = {r["backend"]: r for r in data["results"]}
    for name in ("pil", "torch"):
        r = rows[name]
        assert r["read"] > 0 and r["decode"] > 0 and r["augment"] > 0 and r["total"] > 0, r
        assert r["gpu_ms_per_image"] is None and r["workers"] == 0  # no CUDA: no GPU figure
    assert rows["pil"]["fetch_per_sample"] > 0 and rows["pil"]["fetch_batched"] > 0
    assert "batched fetch" in rows["pil"]["note"]
    assert rows["dali"]["workers"] == 0 and (rows["dali"].get("total") or "unavailable" in rows["dali"]["note"])
    assert data["config"]["spec"]["size_crops"] == [224, 96]  # the paper's views by default
    assert bench_loader.main(["--data", str(data_dir), "--device", "cpu", "--backends", "pil", "--recipe", "quick",
                              "--batch-size", "4", "--batches", "1", "--warmup", "0", "--workers", "0",
                              "--json", str(out)]) == 0
    spec = _read(out)["config"]["spec"]  # --recipe: that recipe's views and augmentations
    assert spec["num_crops"] == [2] and spec["size_crops"] == [48] and spec["jitter_strength"] == 0.3
    args = bench_loader.parse_args([])
    assert bench_loader.workers("dali", args) == bench_loader.workers("pil", args) == (os.cpu_count() or 1)
    assert bench_loader.workers("torch", args) == 0  # the torch loader's own read threads
    timer = bench_loader.GpuTimer(torch.device("cpu"))
    with timer:
        pass
    assert timer.seconds() is None


def test_bench_decode_ratios_on_the_same_jpegs(tmp_path, capsys):
    out = tmp_path / "decode.json"
    assert bench_decode.main(["--device", "cpu", "--size", "64x48", "--images", "6", "--batch", "4",
                              "--repeats", "1", "--warmup", "0", "--json", str(out)]) == 0
    data = _read(out)
    rows = {r["decoder"]: r for r in data["results"]}
    assert list(rows) == list(bench_decode.DECODERS)
    for name in ("torchcodec", "torchvision", "pil"):
        r = rows[name]
        assert r["images_per_s"] > 0 and r["images"] == 6 and r["max_diff"] <= 3, r
        assert abs(r["x_pil"] - r["images_per_s"] / rows["pil"]["images_per_s"]) < 1e-9
    assert rows["pil"]["x_pil"] == 1.0 and rows["pil"]["max_diff"] == 0
    if not torch.cuda.is_available():
        assert "CUDA" in rows["nvimgcodec"]["note"] and "images_per_s" not in rows["nvimgcodec"]
    assert data["config"]["torchcodec"] and "torch" in data["env"]
    assert "x torchvision" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="--decoders: unknown nope"):
        bench_decode.parse_args(["--decoders", "pil,nope"])


def test_bench_e2e_builds_and_compiles_one_step_for_all_loaders(tmp_path, monkeypatch):
    data_dir = write_image_folder(tmp_path / "data", per_class=4)
    made = []
    real = bench_e2e.make_step

    def counting(*a, **k):
        made.append(a[0])
        return real(*a, **k)

    monkeypatch.setattr(bench_e2e, "make_step", counting)
    out = tmp_path / "e2e.json"
    assert bench_e2e.main([*TINY_MODEL, "--data", str(data_dir), "--workers", "0", "--mode", "compile",
                           "--loaders", "pil,torch", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert made == ["compile"]
    first, second = data["results"]
    assert first["compile_s"] > 0 and "compile_s" not in second and data["config"]["compile_s"] > 0
    assert second["mode"] == "compile" and second["e2e_images_per_s"] > 0
    assert data["config"]["sync_each_step"] is False  # no host synchronisation between steps by default
    assert bench_e2e.parse_args(["--sync-each-step"]).sync is True
    assert bench_e2e.StepClock(torch.device("cpu")).gpu() is None


def test_bench_e2e_with_plot(tmp_path):
    data_dir = write_image_folder(tmp_path / "data", per_class=4)
    out = tmp_path / "e2e.json"
    assert bench_e2e.main([*TINY_MODEL, "--data", str(data_dir), "--workers", "0", "--mode", "compile",
                           "--json", str(out)]) == 0
    data = _read(out)
    (row,) = data["results"]
    for key in ("loader_images_per_s", "step_images_per_s", "e2e_images_per_s", "e2e_over_step", "wait_ms",
                "compute_ms", "wait_fraction", "bottleneck", "compile_s"):
        assert row[key] is not None, key
    assert row["loader"] == "pil" and row["mode"] == "compile" and 0 <= row["wait_fraction"] <= 1
    assert data["fastest_loader"]["loader"] == "pil" and data["config"]["images"] == 12
    png = tmp_path / "e2e.png"
    assert data["plot"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_e2e_unknown_loader_is_a_row(tmp_path):
    data_dir = write_image_folder(tmp_path / "data", classes=1, per_class=4)
    out = tmp_path / "e2e.json"
    argv = [*TINY_MODEL, "--data", str(data_dir), "--loaders", "nope", "--json", str(out)]
    assert bench_e2e.main(argv) == 0
    (row,) = json.loads(out.read_text())["results"]
    assert row["loader"] == "nope" and "not available" in row["note"]


def test_cli_dispatch(tmp_path):
    out = tmp_path / "s.json"
    assert cli_main(["bench", "sinkhorn", *TINY_SINKHORN, "--modes", "eager", "--json", str(out)]) == 0
    assert {r["mode"] for r in json.loads(out.read_text())["results"]} == {"eager"}
    with pytest.raises(ConfigError, match="bench_nonexistent.py is missing"):
        load("nonexistent")
    with pytest.raises(SystemExit):
        cli_main(["bench", "nonexistent"])


@pytest.mark.parametrize("name,argv,needle", [
    ("step", ["--variants", "turbo:fp32"], "MODE:PRECISION"),
    ("step", ["--crops", "2x224,six"], "COUNTxSIZE"),
    ("step", ["--batch", "0"], ">= 1"),
    ("methods", ["--methods", "swav,mae"], "unknown mae"),
    ("methods", ["--variants", "plain-compile:fp32"], "SwAV-only"),
    ("methods", ["--bank-size", "2"], "--bank-size"),
])
def test_bench_rejects_bad_arguments(name, argv, needle, capsys):
    assert cli_main(["bench", name, "--device", "cpu", *argv]) == 2
    assert needle in capsys.readouterr().err


def test_bench_prepare_rows_per_format_mode_and_workers(tmp_path):
    data = write_image_folder(tmp_path / "src", per_class=4)
    out = tmp_path / "prepare.json"
    assert bench_prepare.main(["--data", str(data), "--formats", "wds,tfrecord", "--workers", "1",
                               "--json", str(out)]) == 0
    result = _read(out)
    rows = {(r["format"], r["mode"], r["workers"]) for r in result["prepare"]}
    assert rows == {(f, m, 1) for f in ("wds", "tfrecord") for m in ("pass-through", "re-encode")}
    assert all(r["images_per_s"] > 0 for r in result["prepare"])
    assert {r["format"] for r in result["loaders"]} == {"wds", "tfrecord"}
