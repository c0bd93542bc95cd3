"""No host synchronisation in steady state.

GPU: ``torch.cuda.set_sync_debug_mode("error")`` around steady-state iterations of every GPU loader
(torch backend with nvJPEG + GPU augmentation, DALI ``mixed``) feeding every step mode (eager, compile,
graph) raises nothing. CPU: the audit's own logic (with a fake sync-debug switch), its "not applicable"
path, and the CPU stand-in for eager code: no op of an eager training step of any method reads a
tensor's value on the host."""
from __future__ import annotations

import pytest
import torch

from swav_fast.syncaudit import SYNC_MESSAGE, audit_syncs, host_reads, loader_step_iteration
from tests.helpers import tiny_config, write_image_folder
from tests.test_dali_copy import needs_dali
from tests.test_family_methods import BATCH, METHODS, _family_steps, family_config, views_for


# -- the audit's logic (CPU) ----------------------------------------------------------------------
def test_off_cuda_the_iterations_run_and_the_audit_says_not_applicable():
    ran = []
    result = audit_syncs(ran.append, steps=4, warmup=2, device="cpu")
    assert ran == list(range(6))
    assert not result.applicable and result.ok and "not applicable" in result.summary()
    assert "cpu" in result.reason and result.as_dict()["applicable"] is False


def test_a_sync_is_reported_with_its_place_and_the_mode_is_restored():
    modes = ["default"]
    ran = []

    def iteration(i):
        ran.append((i, modes[-1]))
        if i == 3:
            raise RuntimeError(SYNC_MESSAGE)

    result = audit_syncs(iteration, steps=5, warmup=2, set_mode=modes.append, get_mode=lambda: "default")
    assert ran == [(0, "default"), (1, "default"), (2, "error"), (3, "error")]
    assert modes[-1] == "default"  # restored
    assert result.applicable and not result.ok and result.steps == 2
    assert "test_sync_audit.py" in result.syncs[0] and "iteration" in result.syncs[0]
    with pytest.raises(AssertionError, match="host synchronisation in steady state"):
        result.check()
    clean = audit_syncs(lambda i: None, steps=3, warmup=1, set_mode=modes.append, get_mode=lambda: 0)
    assert clean.ok and clean.steps == 3 and modes[-1] == 0 and clean.check() is clean


def test_other_errors_propagate_and_still_restore_the_mode():
    modes = ["default"]

    def iteration(i):
        if i == 1:
            raise RuntimeError("CUDA out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        audit_syncs(iteration, steps=2, warmup=1, set_mode=modes.append, get_mode=lambda: "default")
    assert modes[-1] == "default"


def test_loader_step_iteration_feeds_batches_to_the_step():
    seen = []

    class Batch:
        def __init__(self, k):
            self.views, self.indices = [torch.full((1,), float(k))], torch.tensor([k])

    it = loader_step_iteration(lambda views, lr, i, idx: seen.append((float(views[0]), lr, i, int(idx))),
                               (Batch(k) for k in range(3)), lr=0.2)
    for i in range(3):
        it(i)
    assert seen == [(0.0, 0.2, 0, 0), (1.0, 0.2, 1, 1), (2.0, 0.2, 2, 2)]


# -- the CPU stand-in: eager steps read nothing on the host -----------------------------------------
def test_host_reads_sees_item_bool_and_nonzero():
    x = torch.tensor([1.0, 0.0, 2.0])
    found = host_reads(lambda: (x.sum().item(), bool(x[0] > 0), x.nonzero(), x[x > 0]))
    assert len(found) >= 4 and any("_local_scalar_dense" in f for f in found)
    assert any("nonzero" in f for f in found)
    assert host_reads(lambda: torch.where(x > 0, x, -x).sum()) == []


@pytest.mark.parametrize("name", METHODS)
def test_eager_steady_state_step_of_every_method_reads_nothing_on_the_host(name):
    (step,) = _family_steps(name, ("eager",), torch.device("cpu"))
    cfg = family_config()
    for i in range(2):  # first steps create optimiser state
        step(views_for(cfg, seed=i), 0.1, i, torch.arange(BATCH))
    views, indices = views_for(cfg, seed=2), torch.arange(BATCH)
    assert host_reads(lambda: step(views, 0.1, 2, indices)) == []


def test_swav_eager_step_with_a_full_queue_reads_nothing_on_the_host():
    """The queue flag and fill state come from host copies (the device counter is read until the queue
    is first seen full, then never)."""
    from tests.test_step_modes import batches, make_method, make_step

    step = make_step(make_method(), "eager")
    data = batches(5)
    step.method.on_epoch_start(1)
    for it in range(4):  # BATCH 8, queue 16: full after two pushes
        step(data[it], 0.1, it)
    assert step.method.objective.queue.is_full()
    assert host_reads(lambda: step(data[4], 0.1, 4)) == []
    step.method.objective.queue.reset()
    assert not step.method.objective.queue.is_full()  # read again after a reset


# -- GPU ------------------------------------------------------------------------------------------
def _trainer(tmp_path, loader: str, mode: str):
    from swav_fast.train import Trainer

    data = write_image_folder(tmp_path / "data", classes=2, per_class=40, size=(48, 40))  # 10 batches of 8
    cfg = tiny_config(data, tmp_path / "run", "train.device=cuda", f"train.step_mode={mode}",
                      f"data.loader={loader}", "train.precision=bf16", "train.channels_last=true",
                      "data.workers=2", "methods.swav.queue_length=16", "methods.swav.epoch_queue_starts=0")
    trainer = Trainer(cfg)
    trainer.method.on_epoch_start(0)
    return trainer


def _audit(trainer) -> None:
    trainer.loader.set_epoch(0)
    iteration = loader_step_iteration(trainer.step_fn, trainer.loader)
    result = audit_syncs(iteration, steps=4, warmup=trainer.step_fn.graph_warmup + 2, device="cuda")
    assert result.applicable
    result.check()


def _dali_unless_missing(loader: str) -> list:
    return [needs_dali] if loader == "dali" else []


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["eager", "compile", "graph"])
@pytest.mark.parametrize("loader", [pytest.param(name, marks=_dali_unless_missing(name))
                                    for name in ("torch", "dali")])
def test_gpu_loader_and_step_do_not_sync_in_steady_state(fresh_dynamo, tmp_path, loader, mode):
    """Every GPU loader (torch: nvJPEG + GPU augmentation; DALI mixed) x every step mode."""
    trainer = _trainer(tmp_path, loader, mode)
    try:
        _audit(trainer)
        assert trainer.step_fn.mode == mode, trainer.step_fn.stats.fallback_reason
    finally:
        trainer.loader.close()
