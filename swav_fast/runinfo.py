"""What a run says about itself: the start-of-run block, the progress bar's text, the end-of-run lines.

Pure formatting over a built :class:`~swav_fast.train.Trainer` (its :class:`~swav_fast.run.Run`) (or plain values), so that the
trainer calls one function at start (:func:`describe_run`) and the tests check the text.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from swav_fast.step_modes import STEP_MODES


def step_mode_line(requested: str, effective: str, fallback_reason: str | None) -> str:
    """``eager (train.step_mode=eager: plain PyTorch, ...)`` or the fallback and its reason."""
    if effective != requested:
        return f"{effective} (train.step_mode={requested} is not possible here: {fallback_reason})"
    return f"{effective} (train.step_mode={requested}: {STEP_MODES.get(effective) if effective in STEP_MODES else ''})"


def knn_plan(at_end: bool, knn_data: str | Path | None, data_given: bool) -> str:
    """What happens at the end of training: kNN on a folder, off, or skipped (and how to turn it on)."""
    if not at_end:
        return "off (eval.at_end=false)"
    if knn_data is None:
        why = "--data was given without eval.knn_data" if data_given else "no eval.knn_data"
        return (f"skipped: {why}; add eval.knn_data=FOLDER (a folder with train/ and val/ ImageFolders) "
                "to get kNN top-1 of the trained trunk vs its random init")
    return f"trained trunk vs its random init on {Path(knn_data).resolve()} (train/ = bank, val/ = queries)"


def knn_result_line(knn: dict[str, Any]) -> str:
    """The end-of-run kNN line, with chance (1/classes) and what random init already gives."""
    classes = int(knn["num_classes"])
    chance = 100.0 / max(1, classes)
    return (f"kNN top-1 (k={knn['k']}, T={knn['temperature']}, {knn['num_train']} train / "
            f"{knn['num_val']} val, "
            f"{classes} classes): trained {knn['trained_top1']:.2f}% vs random init "
            f"{knn['random_init_top1']:.2f}% (chance 1/{classes} = {chance:.2f}%; a random-init trunk "
            "already beats chance, so the gain over random init is what training learned)")


#: percentage points of kNN top-1 over random init below which a run has not *clearly* learned
#: (the family learning tests' margin, tests/test_family_learning.py)
CLEAR_GAIN = 5.0


def learning_hint(knn: dict[str, Any], margin: float = CLEAR_GAIN) -> str | None:
    """A one-line warning when ``gain = trained - random init < margin`` points, with what to try; None
    when training clearly learned. The quick recipes are fragile across seeds at their CPU budget
    (docs/methods.md, "Learning across seeds"): one seed can land below random init."""
    gain = float(knn["trained_top1"]) - float(knn["random_init_top1"])
    if not math.isfinite(gain) or gain >= margin:
        return None
    verdict = ("did WORSE than" if gain < 0 else "was not clearly better than")
    return (f"hint: the trained trunk {verdict} its random initialisation ({gain:+.2f} points, "
            f"a clear gain is >= {margin:g}): the quick recipes are fragile across seeds at this budget. "
            "Try another train.seed, 'swav-fast bench learning --seeds 0,1,2,3,4' to see the spread, "
            "or a longer schedule (optim.epochs) and a lower optim.base_lr (docs/methods.md, "
            "'Learning across seeds')")


def progress_desc(epoch: int, epochs: int) -> str:
    """Progress bar label of the (0-based) ``epoch``: ``epoch 3/24``."""
    return f"epoch {epoch + 1}/{epochs}"


def eta_text(steps_done: int, seconds: float, steps_left: int) -> str:
    """Remaining time of the run at the rate so far: ``12m05s`` (``?`` before the first step)."""
    if steps_done <= 0 or seconds <= 0:
        return "?"
    left = max(0, steps_left) * seconds / steps_done
    if not math.isfinite(left):
        return "?"
    h, rem = divmod(int(round(left)), 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def distinct_bad_files(loader: Any) -> int:
    """Unreadable files skipped so far (each file once, however many epochs met it); backends that
    report no paths fall back to their skip count."""
    paths = getattr(loader, "bad_paths", None) or []
    return len(set(paths)) if paths else int(getattr(loader, "num_bad", 0))


def _data_line(trainer: Any) -> str:
    cfg, loader = trainer.cfg, trainer.loader
    index = getattr(loader, "index", None)
    root = getattr(index, "root", index)
    where = str(Path(root).resolve()) if isinstance(root, (str, Path)) else str(cfg.data.path or "?")
    if not cfg.data.path:
        where += " (built-in synthetic dataset)"
    try:
        classes = f", {len(loader.classes)} classes"
    except Exception:  # noqa: BLE001 - a backend that does not know its classes
        classes = ""
    return f"{where}: {loader.dataset_size} images{classes}"


def describe_run(trainer: Any) -> list[str]:
    """The start-of-run block: one line per fact (run folder, data, device, step mode, loader,
    threads, batch, steps, checkpoints, metrics, end-of-run kNN)."""
    cfg, t = trainer.cfg, trainer.cfg.train
    run_dir = Path(trainer.run_dir).resolve()
    stats = trainer.step_fn.stats
    end = min(trainer.total_steps, t.max_steps) if t.max_steps else trainer.total_steps
    steps = (f"{trainer.total_steps} ({cfg.optim.epochs} epochs x {trainer.steps_per_epoch} steps); "
             f"this run: step {trainer.pos.step} -> {end}")
    if t.max_steps and t.max_steps < trainer.total_steps:
        steps += f" (train.max_steps={t.max_steps}; the schedule is unchanged)"
    when = ([f"every {t.checkpoint_every_epochs} epoch(s)"] if t.checkpoint_every_epochs else []) + (
        [f"every {t.checkpoint_every_steps} steps"] if t.checkpoint_every_steps else []) + ["at the end"]
    ckpt = f"{run_dir / 'checkpoints'} ({', '.join(when)}; newest {t.keep_checkpoints or 'all'} kept)"
    metrics = str(run_dir / "metrics.jsonl") + (f", TensorBoard {run_dir / 'tensorboard'}" if t.tensorboard
                                                else "")
    threads = trainer.threads.describe() if getattr(trainer, "threads", None) is not None else "torch default"
    procs = f" per process x {trainer.world} processes = {trainer.global_batch}" if trainer.world > 1 else ""
    rows = [
        ("run folder", str(run_dir)),
        ("method", f"{t.method} on {cfg.model.arch}"),
        ("data", _data_line(trainer)),
        ("device", f"{trainer.device} (train.device={t.device})"),
        ("step mode", step_mode_line(stats.requested_mode, stats.mode, stats.fallback_reason)),
        ("loader", f"{cfg.data.loader} with {cfg.data.workers} worker(s) (--loader, --workers)"),
        ("CPU threads", threads),
        ("batch", f"{cfg.optim.batch_size}{procs} images, {sum(cfg.data.crops.num_crops)} views each"),
        ("steps", steps),
        ("checkpoints", ckpt),
        ("metrics", metrics),
        ("end-of-run kNN", knn_plan(cfg.eval.at_end, trainer.knn_data, bool(cfg.data.path))),
    ]
    width = max(len(k) for k, _ in rows)
    return [f"{k + ':':<{width + 1}} {v}" for k, v in rows]
