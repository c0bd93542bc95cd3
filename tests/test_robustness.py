"""Regression tests of issue 17: hostile datasets, reproducible prepare, divergence, one-line errors."""
from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import time
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from swav_fast import checkpoint as ckpt
from swav_fast.data.synthetic import generate_synthetic
from swav_fast.errors import CheckpointError, ConfigError
from swav_fast.runlog import read_log
from swav_fast.train import train
from tests.helpers import tiny_config, write_image_folder

REPO = Path(__file__).resolve().parents[1]

#: Every loader backend (all are installed in CI; ffcv reads a prepared .beton of the folder).
BACKENDS = ("pil", "torch", "dali", "ffcv")
FOLDER_BACKENDS = ("pil", "torch", "dali")


# -- 1. a synth folder (with its own manifest.json) is an ImageFolder for every loader --------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_loader_trains_on_a_synth_folder(tmp_path, backend):
    data = tmp_path / "synth"
    generate_synthetic(data, num_images=24, num_classes=3, size=(48, 40), seed=0, workers=1, progress=False)
    assert (data / "manifest.json").is_file()  # the foreign manifest that used to confuse the DALI source
    if backend == "ffcv":
        from swav_fast.prepare import prepare_dataset
        prepare_dataset(data, tmp_path / "prep", "beton", workers=1, progress=False)
        data = tmp_path / "prep" / "train"
    cfg = tiny_config(data, tmp_path / "run", f"data.loader={backend}", "train.max_steps=2")
    result = train(cfg)
    assert result.steps == 2 and math.isfinite(result.last_loss)


@pytest.mark.parametrize("backend", FOLDER_BACKENDS)
def test_every_folder_loader_trains_on_the_builtin_dataset(tmp_path, backend):
    cfg = tiny_config(tmp_path / "unused", tmp_path / "run", f"data.loader={backend}", "train.max_steps=2",
                      f"data.synthetic.cache_dir={tmp_path / 'cache'}", "data.synthetic.train_images=24",
                      "data.synthetic.val_images=8", "data.synthetic.classes=3",
                      "data.synthetic.size=[48, 40]")
    cfg.data.path = None
    result = train(cfg)
    assert result.steps == 2 and math.isfinite(result.last_loss)
    assert (tmp_path / "cache").is_dir()


# -- 2. prepare writes the same bytes every time, for every format ----------------------------------
def _dirty_heap(nbytes: int = 1 << 16) -> None:
    """Leave freed, non-zero memory for the next small allocations (as a long-running process has)."""
    for n in (24, 48, 96, 192, 384, 768, nbytes):
        for _ in range(32):
            junk = np.full(n, 0xA5, dtype=np.uint8)
            del junk


@pytest.mark.parametrize("fmt", ("beton", "tfrecord", "wds"))
def test_prepare_twice_gives_identical_bytes(tmp_path, fmt):
    from swav_fast.prepare import prepare_dataset
    from tests.test_prepare import make_source, tree_bytes

    source = make_source(tmp_path / "src")
    trees = []
    for run in ("a", "b"):
        _dirty_heap()
        prepare_dataset(source, tmp_path / run, fmt, shard_size=4, workers=1, progress=False)
        trees.append(tree_bytes(tmp_path / run))
    assert trees[0] == trees[1]
    if fmt == "beton":  # the struct padding of every metadata row is written as zeros
        from pipelines.formats.beton import SAMPLE_META, read_beton_tables
        _, _, meta, _ = read_beton_tables(tmp_path / "a" / "train" / "train.beton")
        raw = np.ascontiguousarray(meta).view(np.uint8).reshape(len(meta), SAMPLE_META.itemsize)
        assert raw[:, 13:16].tobytes() == bytes(3 * len(meta))


def test_join_rows_zeroes_the_padding():
    from pipelines.formats.beton import SAMPLE_META, join_rows
    chunk = np.zeros(4, dtype=SAMPLE_META)
    chunk["f1"] = np.arange(4)
    for _ in range(3):
        _dirty_heap(SAMPLE_META.itemsize * 8)
        joined = join_rows([chunk, chunk], SAMPLE_META)
        assert joined.tobytes() == chunk.tobytes() * 2


# -- 7. a run folder is never silently reused --------------------------------------------------------
def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "swav_fast", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (DEBUG|INFO|WARNING) ")


def _one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit 2, no traceback, and one error line (besides the run's own log records)."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    # a multi-line log record (the start-of-run block) continues on indented lines
    lines = [ln for ln in proc.stderr.splitlines()
             if ln.strip() and not LOG_RECORD.match(ln) and not ln.startswith("  ")]
    assert len(lines) == 1 and lines[0].startswith("swav-fast "), proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


TINY_CLI = ("--no-progress", "model.arch=resnet10_half", "model.hidden_dim=32", "model.feat_dim=16",
            "model.num_prototypes=20", "data.crops.num_crops=[2, 2]", "data.crops.size_crops=[32, 16]",
            "data.crops.min_scale_crops=[0.14, 0.05]", "data.crops.max_scale_crops=[1.0, 0.14]",
            "data.workers=0", "optim.batch_size=8", "optim.epochs=1", "eval.at_end=false",
            "train.max_steps=2")


def test_a_second_run_into_the_same_folder_is_refused_unless_overwrite(tmp_path):
    data = write_image_folder(tmp_path / "data")
    run = tmp_path / "run"
    assert _cli("train", "--data", str(data), "--output", str(run), *TINY_CLI).returncode == 0
    first = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    config = (run / "config.yaml").read_text()
    proc = _cli("train", "--data", str(data), "--output", str(run), *TINY_CLI, "model.arch=resnet18")
    _one_line_error(proc, str(run), "already holds a run", "--resume", "--overwrite")
    # nothing of the first run was touched
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()} == first
    assert (run / "config.yaml").read_text() == config
    _one_line_error(_cli("train", "--data", str(data), "--output", str(run), "--resume", "auto",
                         "--overwrite", *TINY_CLI), "give one")

    proc = _cli("train", "--data", str(data), "--output", str(run), "--overwrite", *TINY_CLI,
                "model.arch=resnet18")
    assert proc.returncode == 0, proc.stderr
    (aside,) = [p for p in run.iterdir() if p.name.startswith("replaced-")]
    assert {p.name: p.read_bytes() for p in (aside / "checkpoints").iterdir()} == first  # moved, not lost
    assert (aside / "config.yaml").read_text() == config
    state = torch.load(ckpt.latest_valid_checkpoint(run)[0], weights_only=True)
    assert state["config"]["model"]["arch"] == "resnet18"  # the new run's weights were written
    assert "resnet18" in (run / "config.yaml").read_text()
    assert [r["kind"] for r in read_log(run)].count("done") == 1  # a fresh metrics.jsonl
    assert "--overwrite" in _cli("train", "--help").stdout


def test_resume_into_the_same_folder_is_allowed(tmp_path):
    data = write_image_folder(tmp_path / "data")
    run = tmp_path / "run"
    train(tiny_config(data, run, "train.max_steps=2"))
    with pytest.raises(ConfigError, match="already holds a run"):
        train(tiny_config(data, run, "train.max_steps=3"))
    assert train(tiny_config(data, run, "train.max_steps=3"), resume="auto").steps == 3


# -- 3. divergence: detected, rolled back to the checkpoint before it, or stopped with one line ------
def test_divergence_rolls_back_to_the_checkpoint_before_it(tmp_path, monkeypatch):
    from swav_fast.train import Trainer
    data = write_image_folder(tmp_path / "data")  # 24 images, batch 8: 3 steps per epoch
    run = tmp_path / "run"
    cfg = tiny_config(data, run, "optim.epochs=3", "train.checkpoint_every_steps=2",
                      "train.keep_checkpoints=0",
                      "train.on_divergence=rollback", "train.rollback_lr_factor=0.5",
                      "train.debug_blowup_steps=[4]")  # weights x 1e6 before the 5th step: finite, wrecked
    after_rollback = {}
    original = Trainer.handle_divergence

    def spy(self, exc):
        original(self, exc)
        after_rollback.update({k: v.clone() for k, v in self.model.state_dict().items()}, step=self.pos.step)

    monkeypatch.setattr(Trainer, "handle_divergence", spy)
    result = train(cfg)
    assert result.steps == 9  # the run completes
    (rb,) = [r for r in read_log(run) if r["kind"] == "rollback"]
    assert rb["detected_at"] == 5 and rb["restored_step"] == 4
    assert rb["checkpoint"].endswith("ckpt-000000004.pt")
    assert rb["skipped_steps"] == [5, 5] and rb["lr_scale"] == 0.5 and after_rollback["step"] == 5
    healthy = torch.load(ckpt.checkpoint_path(run, 4), weights_only=True)
    for k, v in healthy["model"].items():  # the resumed weights are the pre-divergence checkpoint's
        assert torch.equal(after_rollback[k], v), k
    final = torch.load(ckpt.checkpoint_path(run, 9), weights_only=True)
    assert final["lr_scale"] == 0.5 and final["rollbacks"] == 1
    from swav_fast.guards import weight_norm
    assert weight_norm(final["model"].values()) < 10 * weight_norm(healthy["model"].values())


def test_divergence_stop_names_the_healthy_checkpoint(tmp_path):
    data = write_image_folder(tmp_path / "data")
    run = tmp_path / "run"
    cfg = tiny_config(data, run, "optim.epochs=3", "train.checkpoint_every_steps=1", "train.log_every=3",
                      "train.debug_blowup_steps=[4]")  # default train.on_divergence=stop
    from swav_fast.errors import TrainingDiverged
    with pytest.raises(TrainingDiverged, match="last checkpoint .*ckpt-000000004.pt is intact") as e:
        train(cfg)
    assert "diverged at step 5" in str(e.value) and "weight norm" in str(e.value)
    assert ckpt.latest_valid_checkpoint(run)[0].name == "ckpt-000000004.pt"  # the wrecked state was not saved
    (rec,) = [r for r in read_log(run) if r["kind"] == "diverged"]
    assert rec["healthy_checkpoint"].endswith("ckpt-000000004.pt")


def test_rollback_limit_and_a_huge_learning_rate_stop_with_one_line(tmp_path):
    data = write_image_folder(tmp_path / "data")
    run = tmp_path / "run"
    # base_lr=1e30: the first step is finite but wrecks the weights (the reproduction)
    proc = _cli("train", "--data", str(data), "--output", str(run), *TINY_CLI, "optim.base_lr=1e30",
                "optim.warmup_epochs=0",
                "train.log_every=5", "train.checkpoint_every_steps=1", "train.on_divergence=rollback")
    _one_line_error(proc, "diverged at step 1", "nothing to roll back to",
                    "no checkpoint that passed the health checks")
    assert ckpt.list_checkpoints(run) == []
    # a blow-up before every step from the 3rd on: rollbacks up to the limit, then a stop
    run2 = tmp_path / "run2"
    cfg = tiny_config(data, run2, "optim.epochs=3", "train.checkpoint_every_steps=2",
                      "train.on_divergence=rollback",
                      "train.max_rollbacks=2", "train.debug_blowup_steps=[2, 3, 4, 5, 6, 7, 8]")
    from swav_fast.errors import TrainingDiverged
    with pytest.raises(TrainingDiverged, match=r"2 rollback\(s\) already"):
        train(cfg)
    assert [r["kind"] for r in read_log(run2)].count("rollback") == 2


# -- 4. one line, exit 2, no traceback ----------------------------------------------------------------
def test_a_run_of_unreadable_images_with_pil_workers_is_one_line(tmp_path):
    data = write_image_folder(tmp_path / "data")
    for p in data.rglob("*.jpg"):
        p.write_bytes(b"not a jpeg at all")
    proc = _cli("train", "--data", str(data), "--output", str(tmp_path / "run"), "--loader", "pil",
                "--workers", "2", *TINY_CLI)
    _one_line_error(proc, "consecutive unreadable images")
    assert "DataLoader worker" not in proc.stderr


def test_a_malformed_recipe_is_one_line_naming_file_and_line(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model:\n  arch: resnet18\noptim: {base_lr: [0.1, \n  epochs: 3\n")
    proc = _cli("train", "--recipe", str(recipe), "--output", str(tmp_path / "run"))
    _one_line_error(proc, str(recipe), "not valid YAML", "line ")


def test_workers_of_a_killed_run_exit_quietly(tmp_path):
    data = write_image_folder(tmp_path / "data", per_class=16)
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = ["train", "--data", str(data), "--output", str(run), "--loader", "pil", "--workers", "2",
            *TINY_CLI[:-1], "optim.epochs=50"]
    proc = subprocess.Popen([sys.executable, "-m", "swav_fast", *args],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if (run / "metrics.jsonl").exists() and any(r["kind"] == "step" for r in read_log(run)):
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=120)  # EOF once the workers (holding stderr too) are gone
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


# -- 6. EXIF orientation: the same pixels from every loader ------------------------------------------
def _exif_folder(root: Path, orientation: int) -> Path:
    """One 48x32 JPEG (stored) with an EXIF orientation: a diagonal ramp and a bright corner block."""
    from PIL import Image
    y, x = np.mgrid[0:32, 0:48]
    img = np.stack([x * 5, y * 7, (x + y) * 3], axis=-1).astype(np.float64)
    img[:10, :14] = [250, 250, 20]
    ex = Image.Exif()
    ex[0x0112] = orientation
    (root / "class_0").mkdir(parents=True)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / "class_0" / "a.jpg", quality=95,
                                                                exif=ex.tobytes())
    return root


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("orientation", (6, 3, 5))
def test_every_loader_applies_the_exif_orientation(tmp_path, backend, orientation):
    from PIL import Image, ImageOps

    from pipelines import MultiCropSpec, build_loader
    data = _exif_folder(tmp_path / "data", orientation)
    with Image.open(data / "class_0" / "a.jpg") as im:
        shown = ImageOps.exif_transpose(im).convert("RGB")
        stored = im.convert("RGB")
    w, h = shown.size
    # one view of the whole (displayed) image, no augmentation: the loader's decode, resized
    spec = MultiCropSpec(num_crops=[1], size_crops=[24], min_scale_crops=[1.0], max_scale_crops=[1.0],
                         ratio=[w / h, w / h], flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0,
                         mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])
    source = data
    if backend == "ffcv":
        from swav_fast.prepare import prepare_dataset
        prepare_dataset(data, tmp_path / "prep", "beton", workers=1, progress=False)
        source = tmp_path / "prep" / "train"
    loader = build_loader(source, spec, 1, backend=backend, num_workers=1)
    try:
        view = next(iter(loader)).views[0][0].float().cpu().numpy().transpose(1, 2, 0) * 255
    finally:
        loader.close()

    def as_view(img):
        return np.asarray(img.resize((24, 24), Image.Resampling.BILINEAR), dtype=np.float64)
    right = np.abs(view - as_view(shown)).mean()
    wrong = np.abs(view - as_view(stored.resize(shown.size))).mean() if orientation != 3 else \
        np.abs(view - as_view(stored)).mean()
    assert right < 6.0 and wrong > 3 * right, (right, wrong)


# -- 9. resumed segments, epoch count, wall time, inner checkpoint digest ------------------------------
def test_resumed_segments_are_marked_and_report_sums_their_wall_time(tmp_path):
    from swav_fast.report import summarize
    data = write_image_folder(tmp_path / "data")
    run = tmp_path / "run"
    common = ("optim.epochs=2", "train.checkpoint_every_steps=2")
    train(tiny_config(data, run, *common, "train.max_steps=3"))  # steps 1-3, checkpoint at 2
    ckpt.remove_checkpoint(ckpt.checkpoint_path(run, 3))  # as if killed after step 3's log record
    result = train(tiny_config(data, run, *common), resume="auto")  # resumes at 2: step 3 logged again
    assert result.steps == 6
    records = read_log(run)
    assert {r["segment"] for r in records} == {0, 1}
    assert [(r["segment"], r["step"]) for r in records if r["kind"] == "start"] == [(0, 0), (1, 2)]
    step3 = [r["segment"] for r in records if r["kind"] == "step" and r["step"] == 3]
    assert step3 == [0, 1]  # the repeated step, told apart by its segment
    dones = [r for r in records if r["kind"] == "done"]
    assert [r["segment"] for r in dones] == [0, 1]
    summary = summarize(records)
    assert summary["segments"] == 2
    assert summary["seconds"] == pytest.approx(dones[0]["seconds"] + dones[1]["seconds"])
    # a segment killed before its done record counts from its first to its last record
    cut = [r for r in records if not (r["kind"] == "done" and r["segment"] == 0)]
    first = [r["time"] for r in cut if r["segment"] == 0]
    assert summarize(cut)["seconds"] == pytest.approx(max(first) - min(first) + dones[1]["seconds"])


def test_resuming_a_finished_run_reports_its_epochs(tmp_path):
    data = write_image_folder(tmp_path / "data")
    run = tmp_path / "run"
    cfg = ("optim.epochs=2", "train.checkpoint_every_steps=3")  # the last checkpoint is at an epoch's end
    assert train(tiny_config(data, run, *cfg)).epochs == 2
    again = train(tiny_config(data, run, *cfg), resume="auto")
    assert (again.steps, again.epochs) == (6, 2)


def test_a_checkpoint_without_its_sidecar_is_still_verified(tmp_path):
    data = write_image_folder(tmp_path / "data")
    run = tmp_path / "run"
    train(tiny_config(data, run, "train.max_steps=1"))
    path = ckpt.checkpoint_path(run, 1)
    state = ckpt.load_checkpoint(path)
    assert state[ckpt.INNER_DIGEST_KEY] == ckpt.state_digest(state)
    ckpt.digest_path(path).unlink()
    blob = bytearray(path.read_bytes())
    weight = state["model"][next(k for k, v in state["model"].items() if v.numel() > 1000)]
    # the bytes as stored (a channels-last weight's storage order is not its logical order)
    storage = weight.untyped_storage()
    raw = torch.tensor([], dtype=weight.dtype).set_(storage, 0, (storage.nbytes() // weight.element_size(),))
    at = bytes(blob).find(raw.numpy().tobytes()[:256])
    assert at > 0
    blob[at + 100] ^= 0x10  # one flipped bit inside a weight
    path.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="digest stored inside"):
        ckpt.load_checkpoint(path)
    # a checkpoint of an older version (no inner digest) still loads
    old = tmp_path / "old.pt"
    torch.save({k: v for k, v in state.items() if k != ckpt.INNER_DIGEST_KEY}, old)
    assert ckpt.INNER_DIGEST_KEY not in ckpt.load_checkpoint(old)
