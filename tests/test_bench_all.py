"""``swav-fast bench all`` (benchmarks/gpu_check.py) and ``bench record`` on the CPU: the dry run runs every
part with tiny sizes and writes the documented outputs; budget, hard limits and --parts / PARTS= behave;
record.py turns the folder into a RESULTS.md entry; nothing needs the crc32c package."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from benchmarks import gpu_check, record
from swav_fast.cli import main as cli_main

REPO = Path(__file__).resolve().parent.parent
BENCH_PARTS = ("bench-step", "bench-sinkhorn", "bench-e2e", "bench-loader", "bench-decode", "bench-methods")
PYTEST_PARTS = ("step-tests", "loader-tests", "gpu-tests")


def run_check(tmp: Path, *argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The check as the GPU machine runs it: a fresh process from the checkout, PYTHONPATH only."""
    full = {**os.environ, "PYTHONPATH": str(REPO)}
    # as on a fresh machine: no PARTS, and no compile caches inherited from this test process (conftest
    # points them under the session's temp folder, and inductor exports its default once it compiled)
    for var in ("PARTS", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        full.pop(var, None)
    full.update(env or {})
    return subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out", str(tmp / "out"),
                           "--work", str(tmp / "work"), *argv], cwd=REPO, env=full, capture_output=True,
                          text=True, timeout=600)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def parts_of(out: Path) -> dict[str, dict]:
    return {p["name"]: p for p in json.loads((out / "summary.json").read_text())["parts"]}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("check")
    return tmp / "out", run_check(tmp)


def test_dry_run_runs_every_part_and_writes_the_outputs(dry_run):
    out, proc = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["check.tar.gz", "e2e.png", "summary.json", "summary.txt"]  # <= 8 files
    parts = parts_of(out)
    assert list(parts) == gpu_check.PART_NAMES
    sync_file = REPO / "tests" / "test_sync_audit.py"
    for name, p in parts.items():
        if name == "sync-audit" and not sync_file.exists():
            assert p["status"] == "skipped" and "test_sync_audit.py not in this checkout" in p["reason"]
            continue
        assert p["status"] == "ok", p
        assert p["seconds"] > 0 and p["limit_s"] >= p["estimate_s"] > 0 and p["headline"]
    summary = (out / "summary.txt").read_text()
    for name, p in parts.items():  # one line per part: name, status, headline
        line = next(ln for ln in summary.splitlines() if ln.startswith(name + " "))
        assert p["status"] in line and (p.get("headline") or p["reason"]) in line
    assert "torch " in parts["env"]["headline"] and "cpu" in parts["env"]["headline"]
    assert "eager:fp32" in parts["bench-step"]["headline"] and "img/s" in parts["bench-step"]["headline"]
    assert "floor" in parts["bench-sinkhorn"]["headline"]
    assert "torchcodec" in parts["bench-decode"]["headline"] and "x pil)" in parts["bench-decode"]["headline"]
    assert "skipped" in parts["step-tests"]["headline"]  # GPU tests skip on the CPU, with their reason
    assert "bottleneck (torch):" in summary  # where the time goes, per loader
    assert (out / "e2e.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tarball_holds_logs_json_junit_and_summary(dry_run):
    out, _ = dry_run
    with tarfile.open(out / "check.tar.gz") as tar:
        names = set(tar.getnames())
        data = {n: tar.extractfile(n).read() for n in names if n.endswith(".json")}
    ran = [n for n, p in parts_of(out).items() if p["status"] != "skipped"]
    assert {f"check/logs/{n}.log" for n in ran} <= names
    assert {f"check/json/{n}.json" for n in (*BENCH_PARTS, "env", "data")} <= names
    assert {f"check/junit/{n}.xml" for n in PYTEST_PARTS} <= names
    assert {"check/summary.txt", "check/summary.json", "check/e2e.png"} <= names
    env = json.loads(data["check/json/env.json"])
    import torch
    assert env["torch"] == torch.__version__ and env["requested_device"] == "cpu"
    step = json.loads(data["check/json/bench-step.json"])
    assert [r["variant"] for r in step["results"]] == ["eager:fp32", "graph:fp32"]
    assert step["wall_s"] >= step["compile_total_s"] > 0  # compile time reported apart from the rest
    summary = json.loads(data["check/summary.json"])
    assert summary["caches"]["TORCHINDUCTOR_CACHE_DIR"].endswith("inductor-cache")
    assert summary["running"] is False and summary["used_s"] > 0


def test_record_writes_an_entry_into_a_copy_of_results(dry_run, tmp_path, capsys):
    out, _ = dry_run
    results = tmp_path / "RESULTS.md"
    shutil.copy(REPO / "benchmarks" / "RESULTS.md", results)
    before = results.read_text()
    assert cli_main(["bench", "record", str(out), "--results", str(results)]) == 0
    text = results.read_text()
    assert text.startswith(before.rstrip("\n"))  # appended, nothing else touched
    summary = json.loads((out / "summary.json").read_text())
    entry = text[len(before.rstrip("\n")):]
    import torch
    for needle in ("### bench all: dry run", "- device: cpu", f"- date: {summary['started_utc']}",
                   f"- commit: {summary['commit']}", f"torch {torch.__version__}",
                   f"- command: `{summary['command']}`", "| part | status | s | headline |",
                   "| bench-step | ok |", "| variant |", "| loader |", "| problem |", "| method |",
                   "| decoder |"):
        assert needle in entry, needle
    assert summary["command"].startswith("PYTHONPATH=. python3 benchmarks/gpu_check.py --dry-run")
    # recording the same run again replaces its entry instead of adding a second one
    assert record.main([str(out), "--results", str(results)]) == 0
    assert results.read_text() == text and "replaced" in capsys.readouterr().out


def test_record_rejects_a_folder_that_is_not_a_check(tmp_path, capsys):
    assert cli_main(["bench", "record", str(tmp_path), "--results", str(tmp_path / "R.md")]) == 2
    assert "summary.json" in capsys.readouterr().err


def test_budget_skips_later_parts_and_a_part_over_its_limit_is_killed(tmp_path):
    # PARTS= picks the parts; env is killed at its 0.01 s limit; what no longer fits is skipped and listed
    proc = run_check(tmp_path, "--budget", "5", "--limit", "env=0.01", "--estimate", "env=1",
                     "--estimate", "bench-sinkhorn=60", env={"PARTS": "bench-sinkhorn,env,data"})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = tmp_path / "out"
    parts = parts_of(out)
    assert list(parts) == ["env", "data", "bench-sinkhorn"]  # priority order, whatever order was asked
    assert parts["env"]["status"] == "timeout" and "killed at" in parts["env"]["headline"]
    for name in ("data", "bench-sinkhorn"):
        assert parts[name]["status"] == "skipped" and parts[name]["reason"].startswith("needs ~")
    summary = (out / "summary.txt").read_text()
    assert "skipped for time (run them with --parts data,bench-sinkhorn)" in summary
    assert json.loads((out / "summary.json").read_text())["command"].startswith("PARTS=env,data,bench-sinkhorn ")
    with tarfile.open(out / "check.tar.gz") as tar:
        log = tar.extractfile("check/logs/env.log").read().decode()
    assert "killed after its limit" in log


def test_kill_group_ends_the_children_of_a_part(tmp_path):
    child_pid = tmp_path / "child.pid"
    script = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', "
              f"'import time; time.sleep(60)']); open({str(child_pid)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    status, rc = gpu_check.run_command([sys.executable, "-c", script], tmp_path / "x.log", 3, dict(os.environ))
    assert (status, rc) == ("timeout", None)
    pid = int(child_pid.read_text())
    for _ in range(100):  # SIGKILLed with its group; gone (or a zombie) once the kernel has delivered it
        if not alive(pid):
            break
        time.sleep(0.05)
    assert not alive(pid)


@pytest.mark.parametrize("argv,needle", [
    (["--parts", "env,nope"], "unknown nope"),
    (["--limit", "env"], "PART=SECONDS"),
    (["--estimate", "warp=3"], "PART is one of"),
    (["--budget", "0"], "--budget"),
])
def test_bad_arguments_are_one_line_and_exit_2(argv, needle, capsys):
    assert cli_main(["bench", "all", "--dry-run", *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_list_names_every_part_in_order(capsys):
    assert cli_main(["bench", "all", "--list"]) == 0
    names = [ln.split()[0] for ln in capsys.readouterr().out.splitlines()]
    assert names == gpu_check.PART_NAMES


def test_runs_without_the_crc32c_package(tmp_path):
    """The GPU machine's image has no crc32c: the check, the CLI and the loaders import, and TFRecord CRCs
    fall back to the table-driven one, which matches the known vectors (and the package, where present)."""
    code = f"""
import sys
sys.modules["crc32c"] = None
sys.modules["google_crc32c"] = None
import benchmarks.gpu_check, benchmarks.record, swav_fast.cli, pipelines.dali_backend
from pipelines.formats import tfrecord as records
assert records.crc32c is records._crc32c_fallback
assert records.crc32c(b"123456789") == 0xE3069283
assert records.crc32c(b"") == 0 and records.crc32c(bytes(32)) == 0x8A9136AA
assert records.crc32c(bytes([0xFF] * 32)) == 0x62A8AB43
import numpy as np
blob = np.random.default_rng(0).bytes(4096)
open({str(tmp_path / 'blob.bin')!r}, "wb").write(blob)
print(records.crc32c(blob))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    value = int(proc.stdout.strip().splitlines()[-1])
    try:
        import crc32c
    except ImportError:
        return
    assert value == crc32c.crc32c((tmp_path / "blob.bin").read_bytes())


def gpu_context(tmp_path: Path, dali: bool) -> gpu_check.Context:
    args = gpu_check.parse_args(["--out", str(tmp_path / "out")], "x")
    return gpu_check.Context(args, tmp_path / "stage", tmp_path / "out", tmp_path / "data", dali=dali)


@pytest.mark.parametrize("dali", [True, False])
def test_gpu_commands_have_the_issue_sizes_and_parse(tmp_path, dali):
    """The GPU run's commands (never run here): the sizes of the check, and each parses with its benchmark's
    own parser, so the one GPU call cannot fail on an argument."""
    import importlib

    ctx = gpu_context(tmp_path, dali)
    assert ctx.args.device == "cuda" and not ctx.tiny and ctx.args.budget == 480
    commands = {p.name: p.command(ctx) for p in gpu_check.PARTS}
    step = commands["bench-step"]
    for flag, value in (("--variants", "eager:bf16,compile:bf16,graph:bf16"), ("--arch", "resnet50"),
                        ("--batch", "128"), ("--crops", "2x224,6x96")):
        assert step[step.index(flag) + 1] == value
    e2e = commands["bench-e2e"]
    assert e2e[e2e.index("--mode") + 1] == "graph" and e2e[e2e.index("--precision") + 1] == "bf16"
    assert e2e[e2e.index("--loaders") + 1] == ("torch,dali" if dali else "torch")
    assert "--step" in commands["bench-loader"]
    for name, module in record.BENCH_MODULES.items():
        cmd = commands[name]
        assert cmd[1:3] == ["-m", f"benchmarks.{module}"]
        parsed = importlib.import_module(f"benchmarks.{module}").parse_args(cmd[3:])
        assert parsed.json_path == str(ctx.json(name))
    for name in PYTEST_PARTS:
        assert commands[name][1:3] == ["-m", "pytest"] and "gpu" in commands[name]
    assert "--ignore=tests/test_step_modes.py" in commands["gpu-tests"]


def test_dali_is_found_where_the_carried_parts_were_unpacked(tmp_path, monkeypatch):
    site = tmp_path / "dali-site"
    (site / "nvidia" / "dali").mkdir(parents=True)
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setenv("SWAV_FAST_DALI_SITE", str(site))
    args = gpu_check.parse_args([], "x")
    assert gpu_check.find_dali(args) == ([str(site)], f"unpacked in {site}")
    env = gpu_check.child_env(args, tmp_path, [str(site)])
    assert env["PYTHONPATH"].split(os.pathsep)[:2] == [str(REPO), str(site)]
    assert env["TORCHINDUCTOR_CACHE_DIR"] == os.environ.get("TORCHINDUCTOR_CACHE_DIR",
                                                            str(tmp_path / "inductor-cache"))
    monkeypatch.setenv("SWAV_FAST_DALI_SITE", str(tmp_path / "none"))
    paths, note = gpu_check.find_dali(args)
    assert paths == [] and "dali-pack.sh" in note


def test_nvidia_smi_samples_are_summarised_per_part(tmp_path):
    sampler = gpu_check.SmiSampler.__new__(gpu_check.SmiSampler)
    sampler.path, sampler.proc = tmp_path / "smi.csv", object()
    sampler.path.write_text("timestamp, clocks.current.sm [MHz], power.draw [W], utilization.gpu [%]\n"
                            "2026/12/02 06:00:00.000, 345, 80.5, 0\n"
                            "2026/12/02 06:00:00.500, 1980, 650.0, 100\n"
                            "2026/12/02 06:00:01.000, 1960, 640.0, 90\n")
    assert sampler.summary(2, 4) == {"sm_mhz_mean": 1970, "util_mean": 95.0, "power_w_max": 650.0}
