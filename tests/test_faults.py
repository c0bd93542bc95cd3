"""Reliability under faults: SIGKILL/SIGTERM/SIGINT, NaN/inf steps, collapse, failed checkpoint writes,
hostile or broken checkpoints, broken dataset files, bad configs."""
from __future__ import annotations

import errno
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines import build_loader
from swav_fast import checkpoint as ckpt
from swav_fast.cli import main
from swav_fast.config import load_config
from swav_fast.errors import CheckpointError, ConfigError, TrainingDiverged
from swav_fast.faults import CHECKPOINT_PAUSE_ENV
from swav_fast.guards import NonFiniteGuard, is_finite
from swav_fast.methods.swav import collapse_signs
from swav_fast.runlog import read_log
from swav_fast.step import TrainStep
from swav_fast.train import Trainer, train
from tests.helpers import tiny_config, write_image_folder

FAST = ("model.arch=resnet10_half",)


#: The recipe of the CLI runs here (a file, so edits to the shipped recipes do not change these tests).
TINY_RECIPE = """
model: {arch: resnet10_half, hidden_dim: 32, feat_dim: 16, num_prototypes: 20}
methods: {swav: {queue_length: 16, epoch_queue_starts: 1, freeze_prototypes_niters: 2}}
optim: {epochs: 5, batch_size: 8, base_lr: 0.5, final_lr: 0.005, warmup_epochs: 0.5, start_warmup: 0.1}
data:
  workers: 0
  crops: {num_crops: [2, 2], size_crops: [32, 16], min_scale_crops: [0.14, 0.05], max_scale_crops: [1.0, 0.14]}
eval: {at_end: false}
train: {checkpoint_every_steps: 1, log_every: 1, threads: 1, seed: 0}
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("faults") / "data")  # 24 images: 3 steps/epoch


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    path.write_text(TINY_RECIPE)
    return path


def _state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Everything a step may change: model (params + BN stats), queue, optimiser state."""
    out = {f"model.{k}": v.detach().clone() for k, v in trainer.model.state_dict().items()}
    out.update({f"objective.{k}": v.detach().clone() for k, v in trainer.method.objective.state_dict().items()})
    for i, (p, st) in enumerate(trainer.optimizer.state.items()):
        out.update({f"optim.{i}.{k}": v.clone() for k, v in st.items() if isinstance(v, torch.Tensor)})
    return out


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} changed"


def _finite_model(state: dict) -> bool:
    return all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


# -- NaN / inf -----------------------------------------------------------------------------------
@pytest.mark.parametrize("nan_step", [0, 3])
def test_nan_step_changes_nothing(data, tmp_path, nan_step):
    """A NaN step leaves parameters, BN statistics, the queue and momentum exactly as they were."""
    trainer = Trainer(tiny_config(data, tmp_path / "run", *FAST, "methods.swav.queue_length=16",
                                  "methods.swav.epoch_queue_starts=0", f"train.debug_nan_steps=[{nan_step}]"))
    trainer.method.objective.queue_active = True
    batches = []
    for epoch in range(2):
        trainer.loader.set_epoch(epoch)
        batches += list(trainer.loader)
    for it in range(nan_step):
        trainer.step_fn(batches[it].views, 0.5, it)
    before = _state(trainer)
    loss = trainer.step_fn(batches[nan_step].views, 0.5, nan_step)
    assert not torch.isfinite(loss)
    after = _state(trainer)
    if nan_step == 0:  # the first step creates the momentum buffers: zero, i.e. "no momentum yet"
        assert all(not v.any() for k, v in after.items() if k.startswith("optim."))
        after = {k: v for k, v in after.items() if not k.startswith("optim.")}
    _assert_same(before, after)
    assert trainer.step_fn.guard.counts().total == 1
    loss = trainer.step_fn(batches[nan_step + 1].views, 0.5, nan_step + 1)  # and training goes on
    assert torch.isfinite(loss)
    assert not torch.equal(trainer.model.trunk.conv1.weight, before["model.trunk.conv1.weight"])
    counts = trainer.step_fn.guard.counts()
    assert (counts.total, counts.streak, counts.worst_streak) == (1, 0, 1)


def test_nan_step_is_skipped_counted_and_run_continues(data, tmp_path):
    result = train(tiny_config(data, tmp_path / "run", *FAST, "train.debug_nan_steps=[1]", "train.max_steps=4"))
    assert result.steps == 4 and result.nonfinite_steps == 1 and np.isfinite(result.last_loss)
    log = read_log(tmp_path / "run")
    steps = {r["step"]: r for r in log if r["kind"] == "step"}
    assert steps[2]["loss"] is None and steps[2]["nonfinite_steps"] == 1 and steps[4]["loss"] > 0
    assert [r["total"] for r in log if r["kind"] == "nonfinite"] == [1]
    state = ckpt.load_checkpoint(ckpt.list_checkpoints(tmp_path / "run")[-1])
    assert _finite_model(state) and int(state["nonfinite"]["counts"][0]) == 1


def test_repeated_nans_stop_with_message_and_loadable_checkpoint(data, recipe, tmp_path, capsys):
    run = tmp_path / "run"
    cfg = tiny_config(data, run, *FAST, "train.debug_nan_steps=[2, 3, 4, 5, 6, 7]", "train.max_nonfinite_steps=3",
                      "train.checkpoint_every_steps=1", "train.keep_checkpoints=0")
    with pytest.raises(TrainingDiverged, match="NaN/inf for 3 consecutive steps") as e:
        train(cfg)
    last = ckpt.list_checkpoints(run)[-1]
    assert str(last) in str(e.value) and "intact" in str(e.value)
    assert last.name == "ckpt-000000004.pt"  # steps 3 and 4 were skipped, step 5 stopped the run
    found = ckpt.latest_valid_checkpoint(run)
    assert found is not None and found[0] == last and _finite_model(found[1])
    good = ckpt.load_checkpoint(ckpt.checkpoint_path(run, 2))  # before the NaNs: same weights
    for k, v in good["model"].items():
        assert torch.equal(v, found[1]["model"][k]), k
    assert read_log(run)[-1]["kind"] == "diverged"
    # the CLI reports it as one line and exit code 2
    code = main(["train", "--recipe", str(recipe), "--data", str(data), "--output", str(tmp_path / "cli"),
                 "--no-progress", "train.threads=0", "train.debug_nan_steps=[0, 1]", "train.max_nonfinite_steps=2"])
    err = capsys.readouterr().err
    assert code == 2 and "error: the loss was NaN/inf for 2 consecutive steps" in err and "is intact" in err


def test_is_finite_flags_loss_and_gradients():
    ok, nan, inf = torch.tensor(1.0), torch.tensor(float("nan")), torch.tensor(float("inf"))
    assert bool(is_finite(ok)) and not bool(is_finite(nan)) and not bool(is_finite(inf))
    assert not bool(is_finite(ok, [torch.ones(3), torch.tensor([1.0, float("inf")])]))
    guard = NonFiniteGuard(torch.device("cpu"))
    x = torch.ones(3)
    for finite, expected in ((False, 1.0), (False, 1.0), (True, 5.0), (False, 5.0)):
        guard.begin([x])
        x.fill_(5.0 if finite else float("nan"))
        guard.end(torch.tensor(finite), [x])
        assert torch.equal(x, torch.full((3,), expected))
    c = guard.counts()
    assert (c.total, c.streak, c.worst_streak) == (3, 1, 2)


# -- collapse --------------------------------------------------------------------------------------
def test_collapse_signs():
    g = torch.Generator().manual_seed(0)
    healthy = torch.nn.functional.normalize(torch.randn(2, 32, 16, generator=g), dim=-1)
    assert not collapse_signs(3.0, healthy, 0.1).collapsed
    same = healthy[:, :1].expand(2, 32, 16)  # every sample has the same scores
    signs = collapse_signs(3.5, same, 0.1)
    assert signs.prototypes_used == 1 and "one of 16 prototypes" in signs.signs[0]
    uniform = collapse_signs(float(np.log(16)), torch.zeros(2, 32, 16) + 1e-4 * healthy, 0.1)
    assert any("uniform" in s for s in uniform.signs) and "methods.swav.epsilon" in uniform.message()


def test_collapse_is_reported_and_stops_after_patience(data, tmp_path):
    run = tmp_path / "run"
    trainer = Trainer(tiny_config(data, run, *FAST, "methods.swav.freeze_prototypes_niters=0",
                                  "train.collapse_patience=2", "train.checkpoint_every_steps=1"))
    last = trainer.model.head.mlp[-1]  # constant embeddings: the collapsed solution
    last.weight.data.zero_()
    last.weight.requires_grad_(False)
    with pytest.raises(TrainingDiverged, match="collapse") as e:
        trainer.fit()
    msg = str(e.value)
    assert all(f"methods.swav.{key}" in msg for key in ("epsilon", "freeze_prototypes_niters", "queue_length"))
    records = [r for r in read_log(run) if r["kind"] == "collapse"]
    assert len(records) == 2 and records[0]["prototypes_used"] == 1 and records[0]["remedies"]
    assert ckpt.latest_valid_checkpoint(run) is not None


# -- checkpoint writes that fail ---------------------------------------------------------------------
def _fail_from_second_write(monkeypatch, exc: OSError, target: str) -> None:
    """Make every checkpoint write after the first raise ``exc`` (at the rename or mid-write)."""
    calls = {"n": 0}
    if target == "rename":
        real = os.replace

        def replace(src, dst):
            if str(dst).endswith(".pt"):
                calls["n"] += 1
                if calls["n"] > 1:
                    raise exc
            return real(src, dst)
        monkeypatch.setattr(os, "replace", replace)  # the one atomic_write renames with
    else:
        real_write = ckpt._HashingWriter.write

        def write(self, data):
            if not hasattr(self, "_n"):
                calls["n"] += 1
                self._n = 0
            self._n += real_write(self, data)
            if calls["n"] > 1 and self._n > 4096:  # a partial temp file is on disk by now
                raise exc
            return len(data)
        monkeypatch.setattr(ckpt._HashingWriter, "write", write)


@pytest.mark.parametrize("kind", ["read-only", "no-space"])
def test_failed_checkpoint_write_keeps_previous(data, tmp_path, monkeypatch, kind):
    exc = (OSError(errno.EROFS, "Read-only file system") if kind == "read-only"
           else OSError(errno.ENOSPC, "No space left on device"))
    _fail_from_second_write(monkeypatch, exc, "rename" if kind == "read-only" else "write")
    run = tmp_path / "run"
    cfg = tiny_config(data, run, *FAST, "optim.epochs=1", "train.checkpoint_every_steps=1")
    with pytest.raises(CheckpointError) as e:  # default train.on_checkpoint_error=stop
        train(cfg)
    first = ckpt.checkpoint_path(run, 1)
    assert exc.strerror in str(e.value) and f"the last checkpoint {first} is intact" in str(e.value)
    assert ckpt.list_checkpoints(run) == [first]
    assert ckpt.verify_digest(first) and ckpt.load_checkpoint(first)["step"] == 1
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [first.name, first.name + ".sha256"]
    assert read_log(run)[-1]["kind"] == "checkpoint_error"


def test_failed_checkpoint_write_can_continue(data, tmp_path, monkeypatch):
    _fail_from_second_write(monkeypatch, OSError(errno.ENOSPC, "No space left on device"), "write")
    run = tmp_path / "run"
    result = train(tiny_config(data, run, *FAST, "optim.epochs=1", "train.checkpoint_every_steps=1",
                               "train.on_checkpoint_error=continue"))
    assert result.steps == 3
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["ckpt-000000001.pt"]
    errors = [r for r in read_log(run) if r["kind"] == "checkpoint_error"]
    assert [r["step"] for r in errors] == [2, 3] and "No space left" in errors[0]["error"]  # one try a step
    assert ckpt.load_checkpoint(ckpt.checkpoint_path(run, 1))["step"] == 1


UNSHARE_SCRIPT = textwrap.dedent("""
    import os, subprocess, sys, torch
    from swav_fast import checkpoint as ckpt
    from swav_fast.errors import CheckpointError
    mnt = sys.argv[1]
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", mnt], check=True)
    path = os.path.join(mnt, "checkpoints", "ckpt-000000001.pt")
    ckpt.atomic_save({"model": {"w": torch.ones(50_000)}}, path, checksum=True)  # 200 KB
    try:
        ckpt.atomic_save({"model": {"w": torch.zeros(300_000)}}, path, checksum=True)  # 1.2 MB
    except CheckpointError as exc:
        assert "No space left" in str(exc), exc
    else:
        raise SystemExit("the second write should have failed")
    assert torch.equal(ckpt.load_checkpoint(path)["model"]["w"], torch.ones(50_000))
    assert sorted(os.listdir(os.path.dirname(path))) == ["ckpt-000000001.pt", "ckpt-000000001.pt.sha256"]
    print("OK")
""")


def test_real_full_filesystem_keeps_previous(tmp_path):
    """On a real 1 MB tmpfs (in a private mount namespace) when the machine allows it; the simulated
    ENOSPC test above always runs."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-Urm", "true"],
                                                         capture_output=True).returncode != 0:
        pytest.skip("no unprivileged mount namespace here (test_failed_checkpoint_write_keeps_previous "
                    "covers ENOSPC by simulation)")
    (tmp_path / "mnt").mkdir()
    proc = subprocess.run(["unshare", "-Urm", sys.executable, "-c", UNSHARE_SCRIPT, str(tmp_path / "mnt")],
                          capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-2000:]


# -- checkpoints that must not load -------------------------------------------------------------------
class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_checkpoint_that_would_run_code_is_refused(data, tmp_path):
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    train(tiny_config(data, run, *FAST, "train.max_steps=1"))
    evil = ckpt.checkpoint_path(run, 99)
    torch.save({"model": {}, "payload": _RunsCode(marker)}, evil)
    with pytest.raises(CheckpointError, match="refusing to load") as e:
        ckpt.load_checkpoint(evil)
    assert str(evil) in str(e.value)
    trainer = Trainer(tiny_config(data, run, *FAST))
    with pytest.raises(CheckpointError, match="ckpt-000000099.pt"):
        trainer.resume(str(evil))
    assert trainer.resume("auto") and trainer.pos.step == 1  # auto skips it, takes the good one
    assert not marker.exists(), "unpickling ran code"


def test_truncated_foreign_and_tampered_checkpoints(data, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(data, run, *FAST, "optim.epochs=1", "train.checkpoint_every_steps=1"))
    p1, p2, p3 = ckpt.list_checkpoints(run)
    blob = p3.read_bytes()
    p3.write_bytes(blob[: len(blob) // 2])  # truncated, sidecar mismatch
    with pytest.raises(CheckpointError, match=f"{re.escape(str(p3))} is corrupt"):
        ckpt.load_checkpoint(p3)
    ckpt.digest_path(p3).unlink()  # truncated, no sidecar: the load itself fails clearly
    with pytest.raises(CheckpointError, match=f"{re.escape(str(p3))} is truncated or not a torch checkpoint"):
        ckpt.load_checkpoint(p3)
    data2 = bytearray(p2.read_bytes())
    data2[len(data2) // 2] ^= 0xFF  # one flipped bit: only the checksum notices
    p2.write_bytes(bytes(data2))
    with pytest.raises(CheckpointError, match="corrupt"):
        ckpt.load_checkpoint(p2)
    foreign = tmp_path / "foreign.pt"
    torch.save(torch.ones(3), foreign)
    with pytest.raises(CheckpointError, match="not a swav-fast checkpoint"):
        ckpt.load_checkpoint(foreign)
    (tmp_path / "notes.pt").write_text("hello")
    with pytest.raises(CheckpointError, match="notes.pt"):
        ckpt.load_checkpoint(tmp_path / "notes.pt")
    skipped: list[str] = []
    path, state = ckpt.latest_valid_checkpoint(run, log=skipped.append)
    assert path == p1 and state["step"] == 1 and len(skipped) == 2


def test_leftovers_of_an_interrupted_write_are_removed(data, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(data, run, *FAST, "train.max_steps=1"))
    folder = run / "checkpoints"
    (folder / ".ckpt-000000002.pt.abc123.tmp").write_bytes(b"half")
    (folder / "ckpt-000000002.pt.sha256").write_text("0" * 64 + "  ckpt-000000002.pt\n")
    (folder / "keep-me.txt").write_text("not ours")
    Trainer(tiny_config(data, run, *FAST))
    assert sorted(p.name for p in folder.iterdir()) == ["ckpt-000000001.pt", "ckpt-000000001.pt.sha256",
                                                        "keep-me.txt"]


# -- config ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override,needles", [
    ("train.bogus=1", ["unknown config key", "train.bogus", "on_checkpoint_error", "max_nonfinite_steps"]),
    ("train.debug_nan_steps=3", ["train.debug_nan_steps must be a list"]),
    ("train.max_nonfinite_steps=ten", ["must be an integer"]),
    ("train.on_checkpoint_error=retry", ["train.on_checkpoint_error='retry'", "valid: stop, continue"]),
    ("model.arch=resnet9000", ["model.arch='resnet9000'", "resnet50", "resnet10_half"]),
    ("data.loader=nope", ["data.loader='nope'", "valid: ", "pil", "torch"]),
    ("train.device=gpu", ["valid: auto, cpu, cuda, cuda:N"]),
    ("train.max_nonfinite_steps=-1", ["train.max_nonfinite_steps=-1 must be >= 0"]),
    ("train.log_every=0", ["train.log_every=0 must be >= 1"]),
    ("methods.swav.crops_for_assign=[0, 4]", ["crops_for_assign", "[0, 3]", "4 crops"]),
    ("methods.swav.queue_length=20", ["multiple of the global batch 8", "try 16 or 24"]),
])
def test_bad_config_rejected_before_any_work(data, tmp_path, override, needles):
    run = tmp_path / "run"
    with pytest.raises(ConfigError) as e:
        Trainer(tiny_config(data, run, override))
    for needle in needles:
        assert needle in str(e.value)
    assert not run.exists()


def test_queue_must_fit_the_global_batch_of_all_ranks():
    cfg = load_config(None, ["optim.batch_size=8", "methods.swav.queue_length=16"])
    cfg.validate(world_size=2)
    with pytest.raises(ConfigError, match="global batch 24 .optim.batch_size 8 x world size 3"):
        cfg.validate(world_size=3)


# -- SIGINT in-process ----------------------------------------------------------------------------------
def test_sigint_writes_checkpoint_and_returns(data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real_call = TrainStep.__call__

    def call(self, views, lr, iteration, indices=None):
        if iteration == 1:
            os.kill(os.getpid(), signal.SIGINT)  # arrives mid-step; honoured at the step boundary
        return real_call(self, views, lr, iteration, indices)
    monkeypatch.setattr(TrainStep, "__call__", call)
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when started from a shell that ignores SIGINT
    trainer = Trainer(tiny_config(data, run, *FAST, "optim.epochs=2"))
    result = trainer.fit()
    monkeypatch.undo()
    assert result.signal == signal.SIGINT and result.steps == 2  # honoured even where it was ignored
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
    assert ckpt.list_checkpoints(run)[-1].name == "ckpt-000000002.pt"
    assert read_log(run)[-1]["kind"] == "preempted"
    again = Trainer(tiny_config(data, run, *FAST, "optim.epochs=2"))
    assert again.resume("auto") and again.pos.step == 2 and again.fit().steps == 6


# -- dataset files that must not crash the loader -------------------------------------------------------
def _png_bomb(path: Path, width: int, height: int) -> None:
    """A valid 1-bit PNG of width x height black pixels: a few KB on disk, huge once decoded."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    comp = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _jpeg_bomb(good_jpeg: Path, path: Path, width: int, height: int) -> None:
    """A real JPEG whose header claims width x height (the decoder would allocate for that)."""
    blob = bytearray(good_jpeg.read_bytes())
    sof = blob.index(b"\xff\xc0")
    blob[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    path.write_bytes(bytes(blob))


def test_broken_and_hostile_image_files_are_skipped_and_counted(tmp_path):
    """Zero bytes, truncated, not an image, and decompression bombs (PNG and JPEG; above our pixel cap
    and above PIL's own hard limit) are skipped and counted; the loader never crashes. (The `prepare`
    command, which would also report them, does not exist yet.)"""
    root = write_image_folder(tmp_path / "data", classes=3, per_class=9)  # 27 good + 5 bad = 4 batches of 8
    good = root / "class_0" / "img_0.jpg"
    bad = [root / "class_0" / "zero.jpg", root / "class_1" / "truncated.jpg", root / "class_1" / "text.png",
           root / "class_2" / "bomb.png", root / "class_2" / "bomb.jpg"]
    bad[0].write_bytes(b"")
    bad[1].write_bytes(good.read_bytes()[:300])
    bad[2].write_text("<html>not an image</html>")
    _png_bomb(bad[3], 10_000, 10_000)  # 100 Mpixel in ~15 KB: over the 89 Mpixel cap
    _jpeg_bomb(good, bad[4], 60_000, 60_000)  # 3.6 Gpixel: over PIL's own limit too
    assert bad[3].stat().st_size < 100_000
    from pipelines.spec import MultiCropSpec
    spec = MultiCropSpec(num_crops=[2, 2], size_crops=[32, 16])
    loader = build_loader(root, spec, batch_size=8, seed=0)
    batches = list(loader)
    assert len(batches) == 4 and all(v.shape[0] == 8 and torch.isfinite(v).all() for b in batches for v in b.views)
    assert loader.num_bad == 5
    assert {Path(p) for p in loader.bad_paths} == set(bad)


# -- SIGKILL / SIGTERM of a real training process ---------------------------------------------------------
TOTAL_STEPS = 15  # TINY_RECIPE on 24 images: 3 steps x 5 epochs


def _start(recipe: Path, data: Path, run: Path, pause: float = 0.0) -> subprocess.Popen:
    """``swav-fast train --resume auto`` in a child; ``pause``: seconds each checkpoint write waits
    between its temp file and the rename (the testing-only hook)."""
    env = {k: v for k, v in os.environ.items() if k != CHECKPOINT_PAUSE_ENV}
    if pause:
        env[CHECKPOINT_PAUSE_ENV] = str(pause)
    run.mkdir(parents=True, exist_ok=True)
    out = open(run.parent / f"{run.name}.out", "ab")
    return subprocess.Popen([sys.executable, "-m", "swav_fast", "train", "--recipe", str(recipe), "--data", str(data),
                             "--output", str(run), "--no-progress", "--resume", "auto"],
                            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=Path(__file__).parents[1])


def _output(run: Path) -> str:
    return (run.parent / f"{run.name}.out").read_text(errors="replace")[-3000:]


def _newest_step(run: Path) -> int:
    paths = ckpt.list_checkpoints(run)
    return int(ckpt.CKPT_RE.match(paths[-1].name).group(1)) if paths else 0


def _temps(run: Path) -> set[str]:
    folder = run / "checkpoints"
    return {p.name for p in folder.iterdir() if ckpt.TEMP_RE.match(p.name)} if folder.is_dir() else set()


def _wait(proc: subprocess.Popen, cond, timeout: float = 180.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"the run ended (code {proc.returncode}) before it could be killed"
        assert time.monotonic() < end, "timed out waiting for the run"
        time.sleep(0.005)


#: Not compared: the config (output_dir differs) and torch's global RNG state, which the DataLoader
#: advances by one draw per iterator it creates, i.e. once more per mid-epoch resume (no training
#: step uses it: augmentations are seeded per sample, and Python/NumPy RNG states are compared).
NOT_COMPARED = {".config", ".rng.torch", ".state_sha256"}  # the digest covers the config and torch RNG


def _assert_same_state(a, b, where: str = "") -> None:
    if where in NOT_COMPARED:
        return
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_state(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs"
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def uninterrupted(recipe, data, tmp_path_factory) -> dict:
    run = tmp_path_factory.mktemp("straight") / "run"
    proc = _start(recipe, data, run)
    assert proc.wait(timeout=300) == 0, _output(run)
    return ckpt.load_checkpoint(ckpt.checkpoint_path(run, TOTAL_STEPS))


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_auto_matches_uninterrupted(recipe, data, tmp_path, uninterrupted):
    """Six SIGKILLs (seeded random delays; the 2nd and 5th inside a checkpoint write, between temp
    file and rename); each ``--resume auto`` continues from the newest complete checkpoint (at most
    one step lost), and the final state equals an uninterrupted run's, bit for bit."""
    rng = random.Random(20240611)
    run = tmp_path / "run"
    kills: list[tuple[int, bool]] = []  # (newest complete checkpoint at the kill, killed mid-write)
    while len(kills) < 6:
        mid_write = len(kills) in (1, 4)
        start, stale = _newest_step(run), _temps(run)
        proc = _start(recipe, data, run, pause=1.0 if mid_write else 0.1)
        try:
            if mid_write:
                _wait(proc, lambda: bool(_temps(run) - stale))  # a new temp file: the write is under way
            else:
                _wait(proc, lambda: _newest_step(run) > start)
            time.sleep(rng.uniform(0.0, 0.5))
        finally:
            proc.kill()
            proc.wait()
        assert proc.returncode == -signal.SIGKILL, _output(run)
        if mid_write:
            assert _temps(run) - stale, "expected to kill inside the checkpoint write"
        kills.append((_newest_step(run), mid_write))
    proc = _start(recipe, data, run)
    assert proc.wait(timeout=300) == 0, _output(run)
    log = read_log(run)
    resumed = [r["step"] for r in log if r["kind"] == "resume"]
    assert resumed == [step for step, _ in kills], (resumed, kills)  # never a half-written checkpoint
    assert log[-1]["kind"] == "done" and log[-1]["steps"] == TOTAL_STEPS
    assert not _temps(run)
    final = ckpt.load_checkpoint(ckpt.checkpoint_path(run, TOTAL_STEPS))
    _assert_same_state(final, uninterrupted)


def test_sigterm_writes_checkpoint_exits_143_and_resumes(recipe, data, tmp_path, uninterrupted):
    run = tmp_path / "run"
    proc = _start(recipe, data, run)
    try:
        _wait(proc, lambda: _newest_step(run) >= 2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 143, _output(run)
    finally:
        proc.kill()
    log = read_log(run)
    assert log[-1]["kind"] == "preempted" and log[-1]["signal"] == "SIGTERM"
    assert _newest_step(run) == log[-1]["step"] < TOTAL_STEPS  # stopped early, checkpoint at the stop
    assert "--resume auto" in _output(run)
    proc = _start(recipe, data, run)
    assert proc.wait(timeout=300) == 0, _output(run)
    _assert_same_state(ckpt.load_checkpoint(ckpt.checkpoint_path(run, TOTAL_STEPS)), uninterrupted)
