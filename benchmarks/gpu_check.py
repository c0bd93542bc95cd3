"""One call that profiles a machine: environment, data, GPU tests and every benchmark, inside a time budget.

    PYTHONPATH=. python3 benchmarks/gpu_check.py [--out DIR] [--budget 480] [--parts a,b,...]
        [--dry-run | --device cpu --tiny] [--work DIR] [--estimate PART=S] [--limit PART=S] [--list]

(also ``swav-fast bench all ...``; ``PARTS=a,b`` in the environment is the same as ``--parts``). It needs
no ``pip install``: every part runs from this checkout (``PYTHONPATH``) on the Python and torch at hand,
whose versions it records. Parts run in priority order, each in its own process group with a hard time
limit; a part whose estimate no longer fits into what is left of the budget is skipped and listed, so
a second call (``--parts``) can pick up the rest. All parts share one inductor / triton cache and one
synthetic data set (``--work``), so a second call on the same machine compiles and generates nothing
twice.

Output (``--out``, at most 4 files): ``summary.txt`` (one line per part: ok / failed / timeout /
skipped, seconds, the headline figure; then where the bottleneck is), ``summary.json`` (the same, for
``benchmarks/record.py``), ``check.tar.gz`` (every part's log, JSON and junit XML, the environment,
the ``nvidia-smi`` samples of clocks, power and utilisation) and ``e2e.png`` (the stage chart). The
summary and the tarball are rewritten atomically after every part, so a kill keeps what finished.

``--dry-run`` (= ``--device cpu --tiny``) runs the same parts with tiny sizes on the CPU (GPU tests
then skip); CI runs it so that this harness cannot rot.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.atomic import atomic_write  # noqa: E402 - light: no torch
from swav_fast.errors import ConfigError  # noqa: E402 - light: no torch

REPO = Path(__file__).resolve().parent.parent
DEFAULT_BUDGET_S = 480.0
DEFAULT_WORK = "~/.cache/swav-fast/check"
#: GPU-marked tests, by part (``gpu-tests`` runs every other file with GPU tests)
STEP_TESTS = ["tests/test_step_modes.py"]
SYNC_TESTS = ["tests/test_sync_audit.py"]
LOADER_TESTS = ["tests/test_gpu_aug.py", "tests/test_torch_backend.py", "tests/test_dali_backend.py"]
SMI_QUERY = ("timestamp,clocks.sm,clocks.mem,power.draw,utilization.gpu,utilization.memory,"
             "temperature.gpu,memory.used")
#: synthetic images (count, width, height): full size feeds batch 256 x 12 loader batches; tiny the CPU
DATA = {False: (3072, 500, 375), True: (32, 64, 48)}
TINY_MODEL = ["--device", "cpu", "--arch", "resnet10_half", "--batch", "4", "--crops", "2x32,2x16",
              "--prototypes", "20", "--hidden-dim", "32", "--feat-dim", "16", "--steps", "2", "--warmup", "1",
              "--compile-backend", "eager"]


# -- parts ----------------------------------------------------------------------------------------------
@dataclass
class Context:
    """What every part's command and headline need."""

    args: argparse.Namespace
    stage: Path        # this run's files (logs/, json/, junit/), tarred after every part
    out: Path          # the output folder
    data: Path         # the synthetic ImageFolder
    dali: bool         # DALI importable by the parts (after unpacking carried parts)
    python: str = sys.executable

    @property
    def tiny(self) -> bool:
        return bool(self.args.tiny)

    def json(self, name: str) -> Path:
        return self.stage / "json" / f"{name}.json"

    def junit(self, name: str) -> Path:
        return self.stage / "junit" / f"{name}.xml"

    def read_json(self, name: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.json(name).read_text())
        except (OSError, ValueError):
            return None


@dataclass
class Part:
    name: str
    what: str
    estimate_s: float       # on the GPU machine (the cache cold)
    limit_s: float          # hard limit (the process group is killed)
    tiny_estimate_s: float  # the CPU dry run on 2 cores
    tiny_limit_s: float
    command: Callable[[Context], list[str] | str]  # argv, or a reason to skip
    headline: Callable[[Context, "Outcome"], str]
    needs_data: bool = False


@dataclass
class Outcome:
    name: str
    status: str  # ok / failed / timeout / skipped
    seconds: float | None = None
    estimate_s: float | None = None
    limit_s: float | None = None
    rc: int | None = None
    headline: str = ""
    reason: str = ""
    command: list[str] = field(default_factory=list)
    gpu: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v not in (None, "", [], {})}


def _bench(module: str, ctx: Context, name: str, args: list[str]) -> list[str]:
    return [ctx.python, "-m", f"benchmarks.{module}", *args, "--json", str(ctx.json(name))]


def _pytest(ctx: Context, name: str, files: list[str], extra: Sequence[str] = ()) -> list[str]:
    return [ctx.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "-o", "timeout=300",
            f"--junitxml={ctx.junit(name)}", *extra, *files]


def cmd_env(ctx: Context) -> list[str]:
    return [ctx.python, "-m", "benchmarks.gpu_check", "_env", str(ctx.json("env")), ctx.args.device]


def cmd_data(ctx: Context) -> list[str]:
    n, w, h = DATA[ctx.tiny]
    return [ctx.python, "-m", "benchmarks.gpu_check", "_data", str(ctx.data), str(n), f"{w}x{h}",
            str(ctx.json("data"))]


def cmd_step_tests(ctx: Context) -> list[str]:
    return _pytest(ctx, "step-tests", STEP_TESTS)


def cmd_sync_audit(ctx: Context) -> list[str] | str:
    missing = [f for f in SYNC_TESTS if not (REPO / f).exists()]
    if missing:
        return f"{', '.join(missing)} not in this checkout"
    return _pytest(ctx, "sync-audit", SYNC_TESTS)


def cmd_loader_tests(ctx: Context) -> list[str] | str:
    files = [f for f in LOADER_TESTS if (REPO / f).exists()]
    return _pytest(ctx, "loader-tests", files) if files else f"none of {', '.join(LOADER_TESTS)} here"


def cmd_gpu_tests(ctx: Context) -> list[str]:
    done = STEP_TESTS + SYNC_TESTS + LOADER_TESTS
    return _pytest(ctx, "gpu-tests", ["tests"], [f"--ignore={f}" for f in done if (REPO / f).exists()])


def cmd_bench_step(ctx: Context) -> list[str]:
    if ctx.tiny:
        args = [*TINY_MODEL, "--variants", "eager:fp32,graph:fp32"]  # graph falls back to compile on CPU
    else:
        args = ["--variants", "eager:bf16,compile:bf16,graph:bf16", "--arch", "resnet50", "--batch", "128",
                "--crops", "2x224,6x96", "--steps", "20", "--warmup", "3"]
    return _bench("bench_step", ctx, "bench-step", args)


def cmd_bench_sinkhorn(ctx: Context) -> list[str]:
    if ctx.tiny:
        args = ["--device", "cpu", "--rows", "48", "--prototypes", "30", "--views", "4", "--loss-batch", "16",
                "--repeats", "2", "--warmup", "1", "--sets", "2", "--compile-backend", "eager"]
    else:
        args = ["--rows", "4096", "--prototypes", "3000", "--repeats", "100"]
    return _bench("bench_sinkhorn", ctx, "bench-sinkhorn", args)


def loaders(ctx: Context, gpu: list[str]) -> str:
    """The GPU run's loaders, DALI where it is importable; the dry run: pil and torch (DALI's CPU
    pipeline takes tens of seconds to build on 2 cores, and its CPU path has its own tests)."""
    if ctx.tiny:
        return "pil,torch"
    return ",".join(n for n in gpu if n != "dali" or ctx.dali)


def cmd_bench_e2e(ctx: Context) -> list[str]:
    plot = ["--plot", str(ctx.stage / "e2e.png")]
    if ctx.tiny:
        args = [*TINY_MODEL, "--mode", "graph", "--workers", "0",
                "--loaders", loaders(ctx, ["torch", "dali"])]
    else:
        args = ["--loaders", loaders(ctx, ["torch", "dali"]), "--mode", "graph", "--precision", "bf16",
                "--arch", "resnet50", "--batch", "128", "--crops", "2x224,6x96", "--steps", "20",
                "--warmup", "3"]
    return _bench("bench_e2e", ctx, "bench-e2e", [*args, "--data", str(ctx.data), *plot])


def cmd_bench_loader(ctx: Context) -> list[str]:
    if ctx.tiny:
        args = ["--device", "cpu", "--batch-size", "4", "--batches", "2", "--warmup", "1", "--workers", "0",
                "--backends", loaders(ctx, ["torch", "dali"])]
    else:
        args = ["--backends", loaders(ctx, ["torch", "dali", "pil"]), "--batch-size", "256",
                "--batches", "10", "--warmup", "2", "--step", "--profile"]
    return _bench("bench_loader", ctx, "bench-loader", [*args, "--data", str(ctx.data)])


def cmd_bench_decode(ctx: Context) -> list[str]:
    if ctx.tiny:
        args = ["--device", "cpu", "--images", "4", "--batch", "2", "--repeats", "1", "--warmup", "0"]
    else:  # the check's ImageFolder: 500x375 JPEGs
        args = ["--images", "512", "--batch", "256", "--repeats", "5", "--warmup", "1"]
    return _bench("bench_decode", ctx, "bench-decode", [*args, "--data", str(ctx.data)])


def cmd_bench_methods(ctx: Context) -> list[str]:
    if ctx.tiny:
        args = ["--device", "cpu", "--methods", "swav,byol", "--batch", "4", "--crops", "2x32,2x16",
                "--heads", "same", "--hidden-dim", "32", "--feat-dim", "16", "--bank-size", "64",
                "--steps", "1", "--warmup", "1"]
    else:
        args = ["--variants", "eager:bf16", "--steps", "10", "--warmup", "2"]
    return _bench("bench_methods", ctx, "bench-methods", args)


# -- headlines ------------------------------------------------------------------------------------------
def _n(v: Any) -> str:
    return f"{v:,.0f}" if isinstance(v, (int, float)) and abs(v) >= 100 else f"{v:.3g}"


def last_line(ctx: Context, o: Outcome) -> str:
    """The last meaningful line of a part's log (the error of a failed part)."""
    try:
        lines = [ln.strip() for ln in (ctx.stage / "logs" / f"{o.name}.log").read_text(errors="replace")
                 .splitlines() if ln.strip() and not ln.startswith("$ ")]
    except OSError:
        return ""
    return lines[-1][:160] if lines else ""


def head_env(ctx: Context, o: Outcome) -> str:
    e = ctx.read_json("env")
    if not e:
        return last_line(ctx, o)
    dev = f"{e['gpu']} ({e.get('gpu_memory_gib')} GiB)" if e.get("gpu") else "cpu"
    dali = f"DALI {e['dali']}" if e.get("dali") else f"no DALI ({e.get('dali_note', 'not importable')})"
    cuda = f" CUDA {e['cuda']}" if e.get("cuda") else ""
    return f"{dev}, Python {e['python']}, torch {e['torch']}{cuda}, torchvision {e['torchvision']}, {dali}"


def head_data(ctx: Context, o: Outcome) -> str:
    d = ctx.read_json("data")
    if not d:
        return last_line(ctx, o)
    return f"{d['images']} images {d['size']} ({d['mean_kb']} KB mean) in {d['root']}"


def head_pytest(ctx: Context, o: Outcome) -> str:
    try:
        root = ET.parse(ctx.junit(o.name)).getroot()
    except (OSError, ET.ParseError):
        return last_line(ctx, o)
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    count = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    passed = count["tests"] - count["failures"] - count["errors"] - count["skipped"]
    bad = [c.get("name", "?") for c in root.iter("testcase")
           if c.find("failure") is not None or c.find("error") is not None]
    text = f"{passed} passed, {count['failures'] + count['errors']} failed, {count['skipped']} skipped"
    return text + (f" (failed: {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''})" if bad else "")


def _rows(ctx: Context, o: Outcome) -> list[dict[str, Any]] | None:
    data = ctx.read_json(o.name)
    return data.get("results") if data else None


def head_step(ctx: Context, o: Outcome) -> str:
    rows = _rows(ctx, o)
    if rows is None:
        return last_line(ctx, o)
    parts = [f"{r['variant']} {_n(r['images_per_s'])} img/s" if "images_per_s" in r
             else f"{r['variant']} {r.get('note', '-')}" for r in rows]
    compile_s = [r["compile_s"] for r in rows if r.get("compile_s")]
    tail = f"; compile {max(compile_s):.0f} s" if compile_s else ""
    return ", ".join(parts) + tail


def head_sinkhorn(ctx: Context, o: Outcome) -> str:
    rows = _rows(ctx, o)
    if rows is None:
        return last_line(ctx, o)
    codes = [r for r in rows if r["problem"] == "sinkhorn"]
    parts = [f"{r['mode']} {_n(r['us_per_call'])} us" for r in codes if "us_per_call" in r]
    floor = f"; floor {_n(codes[0]['floor_us'])} us" if codes else ""
    return f"{codes[0]['shape'] if codes else ''}: " + ", ".join(parts) + floor


def head_e2e(ctx: Context, o: Outcome) -> str:
    rows = _rows(ctx, o)
    if rows is None:
        return last_line(ctx, o)
    parts = [f"{r['loader']} {_n(r['e2e_images_per_s'])} img/s = {100 * r['e2e_over_step']:.0f}% of step "
             f"({r['bottleneck']})" if "e2e_images_per_s" in r else f"{r['loader']}: {r.get('note', '-')}"
             for r in rows]
    return "; ".join(parts)


def head_loader(ctx: Context, o: Outcome) -> str:
    rows = _rows(ctx, o)
    if rows is None:
        return last_line(ctx, o)
    parts = []
    for r in rows:
        if r.get("total"):
            share = (f" (GPU {100 * r['gpu_fraction_of_step']:.0f}% of step)"
                     if r.get("gpu_fraction_of_step") is not None else "")
            parts.append(f"{r['backend']} {_n(r['total'])} img/s{share}")
        else:
            parts.append(f"{r['backend']}: {r.get('note', '-')}"[:60])
    return ", ".join(parts)


def head_decode(ctx: Context, o: Outcome) -> str:
    rows = _rows(ctx, o)
    if rows is None:
        return last_line(ctx, o)
    parts = []
    for r in rows:
        if not r.get("images_per_s"):
            parts.append(f"{r['decoder']}: n/a")
            continue
        ratio = f" ({r['x_pil']:.2f}x pil)" if r.get("x_pil") and r["decoder"] != "pil" else ""
        parts.append(f"{r['decoder']} {_n(r['images_per_s'])} img/s{ratio}")
    return ", ".join(parts)


def head_methods(ctx: Context, o: Outcome) -> str:
    rows = _rows(ctx, o)
    if rows is None:
        return last_line(ctx, o)
    ok = [r for r in rows if "images_per_s" in r]
    if not ok:
        return f"{len(rows)} methods, none ran"
    slow = min(ok, key=lambda r: r["images_per_s"])
    return (f"{len(ok)}/{len(rows)} methods ran ({ok[0]['variant']}): {ok[0]['method']} "
            f"{_n(ok[0]['images_per_s'])} img/s, slowest {slow['method']} {_n(slow['images_per_s'])} "
            f"({slow.get('ratio', 0):.2f}x)")


PARTS: list[Part] = [
    Part("env", "versions, GPU, DALI", 15, 90, 8, 60, cmd_env, head_env),
    Part("data", "the synthetic ImageFolder (once)", 45, 180, 8, 60, cmd_data, head_data),
    Part("step-tests", "pytest -m gpu " + " ".join(STEP_TESTS), 60, 180, 10, 90, cmd_step_tests, head_pytest),
    Part("bench-step", "ResNet-50 batch 128, 2x224+6x96, eager/compile/graph bf16", 120, 240, 20, 120,
         cmd_bench_step, head_step),
    Part("sync-audit", "pytest -m gpu " + " ".join(SYNC_TESTS), 45, 150, 10, 90, cmd_sync_audit, head_pytest),
    Part("bench-sinkhorn", "Sinkhorn 4096x3000 per implementation vs the bytes floor", 40, 150, 10, 90,
         cmd_bench_sinkhorn, head_sinkhorn),
    Part("loader-tests", "pytest -m gpu " + " ".join(LOADER_TESTS), 45, 150, 10, 90, cmd_loader_tests,
         head_pytest),
    Part("bench-e2e", "torch and DALI loaders feeding the graph step (stage chart)", 70, 180, 20, 120,
         cmd_bench_e2e, head_e2e, needs_data=True),
    Part("bench-loader", "loader throughput per backend and stage", 45, 150, 15, 90, cmd_bench_loader,
         head_loader, needs_data=True),
    Part("gpu-tests", "pytest -m gpu on every other test file", 60, 180, 20, 120, cmd_gpu_tests, head_pytest),
    Part("bench-methods", "every method's step, eager bf16", 80, 200, 15, 120, cmd_bench_methods,
         head_methods),
    Part("bench-decode", "JPEG decode images/s: torchcodec, torchvision.io, nvimgcodec, PIL", 30, 120, 10, 60,
         cmd_bench_decode, head_decode, needs_data=True),
]
PART_NAMES = [p.name for p in PARTS]


# -- arguments ------------------------------------------------------------------------------------------
def _overrides(items: list[str], what: str) -> dict[str, float]:
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            seconds = float(value)
        except ValueError:
            raise ConfigError(f"{what}: {item!r} is not PART=SECONDS") from None
        if name not in PART_NAMES or seconds < 0:
            raise ConfigError(f"{what}: {item!r}: PART is one of {', '.join(PART_NAMES)}, SECONDS >= 0")
        out[name] = seconds
    return out


def parse_args(argv: Sequence[str] | None, prog: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="parts, in order: " + ", ".join(PART_NAMES))
    p.add_argument("--out", default="gpu-check", help="output folder (default ./gpu-check)")
    p.add_argument("--work", default=DEFAULT_WORK,
                   help=f"data, compile caches and staging (default {DEFAULT_WORK}); reused by a second call")
    p.add_argument("--budget", type=float, default=None,
                   help=f"total seconds (default {DEFAULT_BUDGET_S:.0f})")
    p.add_argument("--parts", default=None, help="comma-separated parts (default all; env PARTS= too)")
    p.add_argument("--device", default=None, choices=["cuda", "cpu"], help="default cuda, cpu with --dry-run")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (with --device cpu: the dry run)")
    p.add_argument("--dry-run", action="store_true", help="= --device cpu --tiny")
    p.add_argument("--dali-dir", default=".device-dali",
                   help="where ../shared/device/dali-pack.sh put bin/unpack.sh (parts in /root/dali)")
    p.add_argument("--estimate", action="append", default=[], metavar="PART=S", help="override an estimate")
    p.add_argument("--limit", action="append", default=[], metavar="PART=S", help="override a hard limit")
    p.add_argument("--list", action="store_true", help="print the parts with estimates and limits, and exit")
    args = p.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    if args.dry_run:
        args.device, args.tiny = args.device or "cpu", True
    args.device = args.device or "cuda"
    text = args.parts if args.parts is not None else os.environ.get("PARTS") or None
    args.parts_from_env = args.parts is None and text is not None
    names = [n.strip() for n in text.split(",") if n.strip()] if text else list(PART_NAMES)
    unknown = [n for n in names if n not in PART_NAMES]
    if unknown or not names:
        raise ConfigError(f"--parts: unknown {', '.join(unknown) or '(none)'}; "
                          f"valid: {', '.join(PART_NAMES)}")
    args.selected = [n for n in PART_NAMES if n in names]
    args.budget = DEFAULT_BUDGET_S if args.budget is None else args.budget
    if args.budget <= 0:
        raise ConfigError(f"--budget: must be > 0 seconds, got {args.budget}")
    args.estimates, args.limits = _overrides(args.estimate, "--estimate"), _overrides(args.limit, "--limit")
    return args


# -- running --------------------------------------------------------------------------------------------
def kill_group(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM the process group of ``proc`` (started with a new session), SIGKILL what is left."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            # the leader is gone; make sure no child of it lingers in the group
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue
        return


def run_command(cmd: list[str], log_path: Path, timeout_s: float,
                env: dict[str, str]) -> tuple[str, int | None]:
    """Run ``cmd`` in its own process group, output to ``log_path``; ``(status, rc)``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(timeout_s, 0.001))
        except subprocess.TimeoutExpired:
            kill_group(proc)
            log.write(f"\n[gpu_check] killed after its limit of {timeout_s:.0f} s\n")
            return "timeout", None
        except BaseException:
            kill_group(proc)
            raise
    try:  # a part's stray children (e.g. loader workers) end with it
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    return ("ok" if rc == 0 or (rc == 5 and "pytest" in cmd) else "failed"), rc


def find_dali(args: argparse.Namespace) -> tuple[list[str], str]:
    """Extra PYTHONPATH entries that make DALI importable, and how it was found."""
    try:
        if importlib.util.find_spec("nvidia.dali") is not None:
            return [], "installed"
    except (ImportError, ValueError):
        pass
    site = Path(os.environ.get("SWAV_FAST_DALI_SITE", "/tmp/dali-site"))
    if (site / "nvidia" / "dali").is_dir():
        return [str(site)], f"unpacked in {site}"
    unpack = (REPO / args.dali_dir / "bin" / "unpack.sh").resolve()
    parts = sorted(Path("/root/dali").glob("part*")) if Path("/root/dali").is_dir() else []
    if unpack.exists() and parts:
        try:
            subprocess.run(["bash", "-c", f"source {shlex.quote(str(unpack))}"], timeout=180, check=False,
                           capture_output=True)
        except (OSError, subprocess.SubprocessError) as exc:
            return [], f"unpacking the carried parts failed: {exc}"
        if (site / "nvidia" / "dali").is_dir():
            return [str(site)], f"unpacked from {len(parts)} carried parts into {site}"
        return [], "unpacking the carried parts left no nvidia/dali"
    return [], "not installed and no carried parts (../shared/device/dali-pack.sh)"


def child_env(args: argparse.Namespace, work: Path, extra_path: list[str]) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *extra_path, *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(work / "inductor-cache"))
    env.setdefault("TRITON_CACHE_DIR", str(work / "triton-cache"))
    env.update(PYTHONUNBUFFERED="1", MPLBACKEND="Agg", PYTHONDONTWRITEBYTECODE="1")
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    if args.tiny:  # one intra-op thread: the loaders' threads and the step otherwise oversubscribe 2 cores
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


class SmiSampler:
    """``nvidia-smi`` sampled every 500 ms in the background (clocks, power, utilisation, memory)."""

    def __init__(self, path: Path) -> None:
        self.path, self.proc, self.note = path, None, ""
        exe = shutil.which("nvidia-smi")
        if exe is None:
            self.note = "nvidia-smi not found: no GPU samples"
            return
        self.file = open(path, "w")
        self.proc = subprocess.Popen([exe, f"--query-gpu={SMI_QUERY}", "--format=csv,nounits", "-lms", "500"],
                                     stdout=self.file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)

    def mark(self) -> int:
        """Lines sampled so far (a part's samples are the lines between two marks)."""
        if self.proc is None:
            return 0
        self.file.flush()
        try:
            return len(self.path.read_text(errors="replace").splitlines())
        except OSError:
            return 0

    def summary(self, start: int, end: int) -> dict[str, float]:
        """Mean SM clock, mean utilisation and peak power over the samples ``[start, end)``."""
        if self.proc is None:
            return {}
        lines = self.path.read_text(errors="replace").splitlines()
        head = [h.strip() for h in (lines[0].split(",") if lines else [])]
        cols: dict[str, list[float]] = {h: [] for h in head}
        for line in lines[max(start, 1):end]:
            for h, v in zip(head, line.split(",")):
                try:
                    cols[h].append(float(v))
                except ValueError:
                    pass

        def pick(prefix: str) -> list[float]:
            return next((v for h, v in cols.items() if h.startswith(prefix) and v), [])

        out = {}
        if pick("clocks.current.sm") or pick("clocks.sm"):
            sm = pick("clocks.current.sm") or pick("clocks.sm")
            out["sm_mhz_mean"] = round(sum(sm) / len(sm))
        if pick("utilization.gpu"):
            u = pick("utilization.gpu")
            out["util_mean"] = round(sum(u) / len(u), 1)
        if pick("power.draw"):
            out["power_w_max"] = round(max(pick("power.draw")), 1)
        return out

    def stop(self) -> None:
        if self.proc is not None:
            kill_group(self.proc, grace_s=2.0)
            self.file.close()


# -- output ---------------------------------------------------------------------------------------------
def format_summary(s: dict[str, Any]) -> str:
    lines = [f"swav-fast GPU check {s['run_id']}: {s['device_name']}, torch {s.get('torch', '?')}, "
             f"commit {s.get('commit') or '?'}",
             f"command: {s['command']}",
             f"budget {s['budget_s']:.0f} s, used {s['used_s']:.0f} s"
             + (" (still running)" if s["running"] else ""),
             ""]
    rows = [("part", "status", "time s", "est s", "limit s", "headline")]
    for p in s["parts"]:
        head = p.get("headline") or p.get("reason", "")
        if p.get("gpu"):
            g = p["gpu"]
            head += " [GPU " + ", ".join(f"{k} {v}" for k, v in g.items()) + "]"
        rows.append((p["name"], p["status"], f"{p['seconds']:.1f}" if "seconds" in p else "-",
                     f"{p['estimate_s']:.0f}" if "estimate_s" in p else "-",
                     f"{p['limit_s']:.0f}" if "limit_s" in p else "-", head))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     + "  " + r[5])
    skipped = [p for p in s["parts"]
               if p["status"] == "skipped" and p.get("reason", "").startswith("needs ~")]
    if skipped:
        lines += ["", "skipped for time (run them with --parts " + ",".join(p["name"] for p in skipped)
                  + "): " + "; ".join(f"{p['name']} ({p['reason']})" for p in skipped)]
    if s.get("verdict"):
        lines += ["", *s["verdict"]]
    if s.get("notes"):
        lines += ["", *s["notes"]]
    return "\n".join(lines) + "\n"


def verdict(ctx: Context) -> list[str]:
    """Where the time goes, from the end-to-end and loader figures: which stage limits, by how much."""
    out = []
    e2e = ctx.read_json("bench-e2e")
    for r in (e2e or {}).get("results", []):
        if "e2e_images_per_s" not in r:
            continue
        gap = max(1.0, 1 / r["e2e_over_step"]) if r["e2e_over_step"] > 0 else float("inf")
        if r["bottleneck"] == "loader":
            why = (f"the GPU idles {100 * r['gpu_idle_fraction']:.0f}% of each step"
                   if r.get("gpu_idle_fraction") is not None
                   else f"{100 * r['wait_fraction']:.0f}% of each step waits for the loader")
            out.append(f"bottleneck ({r['loader']}): the LOADER: end to end "
                       f"{_n(r['e2e_images_per_s'])} img/s "
                       f"= {100 * r['e2e_over_step']:.0f}% of step-only {_n(r['step_images_per_s'])}; {why}; "
                       f"a faster loader gains up to {gap:.2f}x")
        else:
            out.append(f"bottleneck ({r['loader']}): COMPUTE: end to end {_n(r['e2e_images_per_s'])} img/s "
                       f"= {100 * r['e2e_over_step']:.0f}% of step-only {_n(r['step_images_per_s'])}; the "
                       f"loader alone gives {_n(r['loader_images_per_s'])} img/s "
                       f"({r['loader_images_per_s'] / r['step_images_per_s']:.1f}x the step)")
    loader = ctx.read_json("bench-loader")
    if loader and loader.get("step_ms_per_image"):
        for r in loader["results"]:
            if r.get("gpu_fraction_of_step") is not None:
                out.append(f"loader {r['backend']}: its GPU work is "
                           f"{100 * r['gpu_fraction_of_step']:.1f}% of the step's GPU time per image")
    return out


def write_tarball(stage: Path, dest: Path) -> None:
    """``dest`` (a .tar.gz of ``stage``), written atomically (:func:`pipelines.atomic.atomic_write`)."""

    def write(raw) -> None:
        with tarfile.open(fileobj=raw, mode="w:gz") as tar:
            for path in sorted(stage.rglob("*")):
                if path.is_file() and not path.name.startswith("."):
                    tar.add(path, arcname=f"check/{path.relative_to(stage)}", recursive=False)

    atomic_write(dest, write, make_parents=False)


# -- the check ------------------------------------------------------------------------------------------
def check(args: argparse.Namespace, prog: str) -> int:
    from benchmarks.common import git_commit, write_atomic, write_json

    t_start = time.monotonic()
    out, work = Path(args.out).resolve(), Path(os.path.expanduser(args.work)).resolve()
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    stage = work / "runs" / run_id
    for d in (out, stage / "logs", stage / "json", stage / "junit"):
        d.mkdir(parents=True, exist_ok=True)
    for old in ("summary.txt", "summary.json", "check.tar.gz", "e2e.png"):
        if (out / old).exists():
            (out / old).unlink()
    n, w, h = DATA[bool(args.tiny)]
    dali_path, dali_note = find_dali(args)
    ctx = Context(args, stage, out, work / f"data-{n}-{w}x{h}",
                  dali=bool(dali_path) or dali_note == "installed")
    env = child_env(args, work, dali_path)
    env["SWAV_FAST_DALI_NOTE"] = dali_note
    sampler = SmiSampler(stage / "nvidia-smi.csv")
    command = ("PARTS=" + ",".join(args.selected) + " " if args.parts_from_env else "") + \
        " ".join([prog, *map(shlex.quote, args.argv)])
    summary: dict[str, Any] = {
        "version": 1, "run_id": run_id, "command": command, "device": args.device,
        "device_name": args.device, "tiny": bool(args.tiny), "budget_s": args.budget, "used_s": 0.0,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": git_commit(REPO),
        "running": True, "parts": [], "dali": dali_note,
        "caches": {k: env[k] for k in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")},
        "notes": [n for n in (sampler.note, f"DALI: {dali_note}" if not ctx.dali else "") if n],
    }
    selected = set(args.selected)
    if any(p.needs_data for p in PARTS if p.name in selected) and not (ctx.data / "manifest.json").exists():
        selected.add("data")  # a part that reads the data set brings its generation along

    def publish() -> None:
        summary["used_s"] = time.monotonic() - t_start
        envj = ctx.read_json("env") or {}
        summary.update({k: envj[k] for k in ("torch", "torchvision", "python", "cuda", "dali_version")
                        if envj.get(k)})
        if envj:
            summary["device_name"] = envj.get("gpu") or "cpu"
            summary["env"] = envj
        summary["verdict"] = verdict(ctx)
        text = format_summary(summary)
        write_json(stage / "summary.json", summary)
        write_atomic(stage / "summary.txt", text)
        write_tarball(stage, out / "check.tar.gz")
        write_json(out / "summary.json", summary)
        write_atomic(out / "summary.txt", text)
        if (stage / "e2e.png").exists():
            write_atomic(out / "e2e.png", (stage / "e2e.png").read_bytes())

    failed = False
    try:
        for part in PARTS:
            if part.name not in selected:
                continue
            estimate = args.estimates.get(part.name, part.tiny_estimate_s if args.tiny else part.estimate_s)
            limit = args.limits.get(part.name, part.tiny_limit_s if args.tiny else part.limit_s)
            o = Outcome(part.name, "skipped", estimate_s=estimate)
            left = args.budget - (time.monotonic() - t_start)
            cmd = part.command(ctx)
            if isinstance(cmd, str):
                o.reason = cmd
            elif estimate > left:
                o.reason = f"needs ~{estimate:.0f} s, {max(left, 0):.0f} s left"
            else:
                o.limit_s, o.command = min(limit, left), cmd
                print(f"[gpu_check] {part.name}: {part.what} (est {estimate:.0f} s, limit {o.limit_s:.0f} s)",
                      flush=True)
                mark, t0 = sampler.mark(), time.monotonic()
                o.status, o.rc = run_command(cmd, stage / "logs" / f"{part.name}.log", o.limit_s, env)
                o.seconds = time.monotonic() - t0
                o.gpu = sampler.summary(mark, sampler.mark())
                o.headline = part.headline(ctx, o)
                if o.status == "timeout":
                    o.headline = (f"killed at {o.limit_s:.0f} s"
                                  f"{' (end of budget)' if o.limit_s < limit else ''}; {o.headline}")
                failed |= o.status in ("failed", "timeout")
            summary["parts"].append(o.to_dict())
            print(f"[gpu_check] {part.name}: {o.status} {o.headline or o.reason}", flush=True)
            publish()
    finally:
        sampler.stop()
        summary["running"] = False
        summary["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        publish()
    print((out / "summary.txt").read_text(), end="")
    print(f"wrote {out}/summary.txt, summary.json, check.tar.gz"
          f"{', e2e.png' if (out / 'e2e.png').exists() else ''}")
    return 1 if failed else 0


# -- the env and data parts (run as ``python -m benchmarks.gpu_check _env|_data ...``) ----------------
def part_env(json_path: str, device: str) -> int:
    import torch

    from benchmarks.common import env_info, write_json

    info = env_info(device if device == "cpu" or torch.cuda.is_available() else None)
    info["requested_device"] = device
    info["cuda_available"] = torch.cuda.is_available()
    info["executable"] = sys.executable
    for name in ("numpy", "triton", "PIL", "matplotlib", "crc32c"):
        try:
            version = getattr(importlib.import_module(name), "__version__", "yes")
        except ImportError:
            version = None
        info[name if name != "PIL" else "pillow"] = version
    try:
        import nvidia.dali as dali  # type: ignore[import-not-found]

        info["dali"] = dali.__version__
        info["dali_version"] = dali.__version__
    except ImportError as exc:
        info["dali"] = None
        info["dali_note"] = os.environ.get("SWAV_FAST_DALI_NOTE") or str(exc)
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            info["nvidia_smi"] = subprocess.run(
                [smi, "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            info["nvidia_smi"] = f"failed: {exc}"
    write_json(json_path, info)
    print(json.dumps(info, indent=1))
    if device == "cuda" and not torch.cuda.is_available():
        print("CUDA requested but torch.cuda.is_available() is False", file=sys.stderr)
        return 1
    return 0


def part_data(root: str, num: str, size: str, json_path: str) -> int:
    from benchmarks.common import write_json
    from swav_fast.data.synthetic import generate_synthetic

    w, h = (int(v) for v in size.split("x"))
    t0 = time.perf_counter()
    manifest = generate_synthetic(root, num_images=int(num), num_classes=10, size=(w, h), seed=0,
                                  progress=False)
    total = manifest.get("total_bytes") or sum(f.stat().st_size for f in Path(root).rglob("*.jpg"))
    info = {"root": root, "images": int(num), "size": size, "mean_kb": round(total / int(num) / 1024, 1),
            "seconds": round(time.perf_counter() - t0, 2)}
    write_json(json_path, info)
    print(json.dumps(info))
    return 0


def main(argv: Sequence[str] | None = None,
         prog: str = "PYTHONPATH=. python3 benchmarks/gpu_check.py") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_env"]:
        return part_env(*argv[1:3])
    if argv[:1] == ["_data"]:
        return part_data(*argv[1:5])
    args = parse_args(argv, prog)
    if args.list:
        for p in PARTS:
            print(f"{p.name:<15} est {p.estimate_s:>4.0f} s  limit {p.limit_s:>4.0f} s  "
                  f"(tiny {p.tiny_estimate_s:.0f}/{p.tiny_limit_s:.0f})  {p.what}")
        return 0
    return check(args, prog)


def run_script(entry: Callable[[], int]) -> None:
    """``sys.exit(entry())`` for a script run directly: a ConfigError is one line and exit code 2."""
    try:
        sys.exit(entry())
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run_script(main)
