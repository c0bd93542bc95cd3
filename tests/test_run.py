"""The composition root (build_run), the pure config, registry-driven CLI choices, the Checkpointer and
the Health object."""
from __future__ import annotations

import copy
import logging
import math

import pytest
import torch

from swav_fast.checkpointer import Checkpointer, Position
from swav_fast.config import TrainConfig, load_config, resolve_batch
from swav_fast.errors import ConfigError, TrainingDiverged
from swav_fast.guards import Health, NonFiniteGuard
from swav_fast.methods.base import HealthReport
from swav_fast.run import build_run, check_config
from swav_fast.runlog import RunLog, read_log

TINY = ["model.arch=resnet10_half", "model.hidden_dim=32", "model.feat_dim=16", "model.num_prototypes=20",
        "data.crops.num_crops=[2, 2]", "data.crops.size_crops=[32, 16]", "data.workers=0",
        "optim.batch_size=8", "optim.epochs=2", "optim.warmup_epochs=0.5",
        "methods.swav.freeze_prototypes_niters=1", "train.progress=false", "eval.at_end=false", "train.device=cpu", "train.seed=0"]


def synthetic_config(tmp_path, *overrides: str):
    """TINY on a built-in synthetic set of 32 + 16 small images (generated under ``tmp_path``)."""
    return load_config(None, [*TINY, f"data.synthetic.cache_dir={tmp_path / 'cache'}",
                              "data.synthetic.train_images=32", "data.synthetic.val_images=16",
                              "data.synthetic.classes=4", "data.synthetic.size=[40, 30]",
                              f"train.output_dir={tmp_path / 'run'}", *overrides])


def _params(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def composed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    return tmp, build_run(synthetic_config(tmp, "methods.swav.queue_length=16",
                                           "methods.swav.epoch_queue_starts=0"))


# -- build_run ------------------------------------------------------------------------------------------
def test_build_run_composes_a_working_run_on_the_synthetic_set(composed):
    tmp, run = composed
    assert run.device == torch.device("cpu") and (run.world, run.rank) == (1, 0)
    assert run.data_path == run.knn_data / "train" and (run.knn_data / "val").is_dir()  # generated
    assert (run.steps_per_epoch, run.total_steps, run.global_batch) == (4, 8, 8)
    assert run.model is run.method.model and run.step.method is run.method  # no DDP wrap for one process
    trained = {id(p) for g in run.optimizer.param_groups for p in g["params"]}
    assert trained == {id(p) for p in run.method.trainable().parameters()}
    assert run.lr_at(0) == pytest.approx(run.cfg.optim.start_warmup)  # the schedule starts at start_warmup
    before = _params(run.model)
    run.loader.set_epoch(0)
    batch = next(iter(run.loader))
    loss = run.step(batch.views, run.lr_at(0), 0, batch.indices)
    assert math.isfinite(float(loss))
    assert any(not torch.equal(before[k], v) for k, v in run.model.state_dict().items())  # it trains


def test_build_run_checks_registered_names_first(tmp_path):
    with pytest.raises(ConfigError, match="model.arch='nope' is not valid; valid: .*resnet10_half"):
        build_run(synthetic_config(tmp_path, "model.arch=nope"))
    assert not (tmp_path / "cache").exists()  # refused before any work


# -- config is data --------------------------------------------------------------------------------------
def test_validate_is_pure_and_queries_no_registry():
    cfg = load_config(None, ["optim.global_batch_size=256", "model.arch=not_registered",
                             "train.step_mode=not_registered"])
    before = copy.deepcopy(cfg.to_dict())
    assert cfg.validate(world_size=4) is cfg
    assert cfg.to_dict() == before  # nothing rewritten (optim.batch_size stays as given)
    resolved = resolve_batch(cfg, 4)
    assert resolved.optim.batch_size == 64 and cfg.optim.batch_size == before["optim"]["batch_size"]
    assert resolve_batch(resolved, 4) is resolved  # nothing to change: the same object
    with pytest.raises(ConfigError, match="model.arch='not_registered' is not valid"):
        check_config(cfg, 4)  # the registry checks run at composition
    assert cfg.to_dict() == before


# -- CLI choices from the registries ------------------------------------------------------------------------
def test_cli_step_mode_choices_come_from_the_registry(monkeypatch, capsys):
    from swav_fast.cli import build_parser, main
    from swav_fast.step_modes import STEP_MODES

    with pytest.raises(SystemExit) as e:
        main(["train", "--step-mode", "fast"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'fast'" in err and all(m in err for m in STEP_MODES.names())
    monkeypatch.setitem(STEP_MODES._entries, "test-mode", "a mode registered by a plug-in")
    monkeypatch.setitem(STEP_MODES._meta, "test-mode", {})
    assert build_parser().parse_args(["train", "--step-mode", "test-mode"]).step_mode == "test-mode"


def test_cli_loader_and_arch_must_be_registered(capsys):
    from swav_fast.cli import main

    for flag, kind in (("--loader", "loader backend"), ("--arch", "trunk")):
        with pytest.raises(SystemExit) as e:
            main(["train", flag, "nope"])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"unknown {kind} 'nope'; valid: " in err and ("pil" in err or "resnet50" in err)


# -- Checkpointer ------------------------------------------------------------------------------------------
def test_position_conversion_keeps_the_samples_seen():
    pos = Position(epoch=2, step=2 * 10 + 6, batch_in_epoch=6)  # 6 batches of 8 seen in epoch 2
    assert pos.converted(8, 16, steps_per_epoch=5) == Position(2, 2 * 5 + 3, 3)  # 48 samples = 3 of 16
    assert pos.converted(8, 4, steps_per_epoch=20) == Position(2, 2 * 20 + 12, 12)
    assert Position(0, 9, 9).converted(16, 8, steps_per_epoch=12) == Position(0, 12, 12)  # capped


def test_checkpointer_round_trip_and_world_size_conversion(composed, tmp_path, caplog):
    tmp, run = composed
    ck = Checkpointer(tmp_path / "run", keep=2)
    run.method.on_epoch_start(0)  # methods.swav.epoch_queue_starts=0: the queue fills from the first step
    run.loader.set_epoch(0)
    for it, batch in zip(range(2), run.loader):
        run.step(batch.views, run.lr_at(it), it, batch.indices)
    queue = run.method.objective.queue
    assert int(queue.count) > 0  # per-rank state worth keeping
    saved_model, saved_queue = _params(run.model), queue.items.clone()
    state = ck.state(run, Position(0, 2, 2), {"rollbacks": 0})
    for step in (1, 2, 3):
        ck.save(state, step)
    assert [p.name for p in sorted((tmp_path / "run" / "checkpoints").glob("ckpt-*.pt"))] == [
        "ckpt-000000002.pt", "ckpt-000000003.pt"]  # keep-last 2
    path, loaded = ck.find("auto")
    assert path == ck.path(3) and loaded["format"] == "swav-fast/1"

    with torch.no_grad():  # disturb, then load: back to the saved state at the same world size
        for p in run.model.parameters():
            p.add_(1.0)
        queue.items.zero_()
    assert ck.load(run, loaded) == Position(0, 2, 2)
    assert all(torch.equal(saved_model[k], v) for k, v in run.model.state_dict().items())
    assert torch.equal(queue.items, saved_queue)

    # written by 2 processes of 4 images (global batch 8: the position stays) with per-rank queues
    other = dict(loaded, world_size=2, global_batch=8)
    with caplog.at_level(logging.WARNING, logger="swav_fast"):
        assert ck.load(run, other) == Position(0, 2, 2)
    assert "per-rank state" in caplog.text and int(queue.count) == 0 and not queue.items.any()  # reset
    # a global batch of 4: 2 batches of 4 seen = 1 batch of this run's 8
    assert ck.load(run, dict(loaded, global_batch=4)) == Position(0, 1, 1)


# -- Health -------------------------------------------------------------------------------------------------
class FakeMethod:
    """Answers health() from a script of ok / failed checks (None: nothing to check)."""

    def __init__(self, script):
        self.script = list(script)

    def health(self, step, loss):
        ok = self.script.pop(0)
        if ok is None:
            return None
        return HealthReport(ok, {"loss": loss, "used": 1 if not ok else 7}, "" if ok else "codes collapsed; try X",
                            kind="fake_collapse")


def test_health_counts_patience_from_the_method_reports(tmp_path, caplog):
    log = RunLog(tmp_path, enabled=True)
    method = FakeMethod([False, False, True, None, False, False, False])
    health = Health(method, NonFiniteGuard(torch.device("cpu")), log, TrainConfig(collapse_patience=3),
                    note=lambda: "the last checkpoint is intact")
    with caplog.at_level(logging.WARNING, logger="swav_fast"):
        for step in range(1, 7):
            health.check_method(step, 2.5)  # F F (ok resets) (None: no check) F F
        with pytest.raises(TrainingDiverged, match="3 consecutive fake_collapse checks") as e:
            health.check_method(7, 2.5)
    log.close()
    assert "train.collapse_patience=3" in str(e.value) and "the last checkpoint is intact" in str(e.value)
    records = read_log(tmp_path)
    fails = [r for r in records if r["kind"] == "fake_collapse"]
    assert [r["step"] for r in fails] == [1, 2, 5, 6, 7] and all(r["used"] == 1 for r in fails)
    assert [r["reason"] for r in records if r["kind"] == "diverged"] == ["fake_collapse"]
    assert caplog.text.count("codes collapsed; try X") == 2  # once per streak (steps 1 and 5)


def test_health_reports_nonfinite_steps_once(tmp_path):
    log = RunLog(tmp_path, enabled=True)
    guard = NonFiniteGuard(torch.device("cpu"))
    health = Health(FakeMethod([]), guard, log, TrainConfig(max_nonfinite_steps=2))
    guard.load_state_dict({"counts": torch.tensor([1, 1, 1])})
    assert health.check_nonfinite(5).total == 1
    health.check_nonfinite(6)  # nothing new: not reported again
    guard.load_state_dict({"counts": torch.tensor([3, 2, 2])})
    with pytest.raises(TrainingDiverged, match="NaN/inf for 2 consecutive steps"):
        health.check_nonfinite(7)
    log.close()
    assert [(r["step"], r["skipped"]) for r in read_log(tmp_path) if r["kind"] == "nonfinite"] == [(5, 1), (7, 2)]
