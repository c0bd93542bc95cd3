"""Training loop: prototypes, freezing, queue start, exact resume, checkpoints."""
from __future__ import annotations

import pytest
import torch

from swav_fast import checkpoint as ckpt
from swav_fast.runlog import read_log
from swav_fast.train import Trainer, train
from tests.helpers import tiny_config, write_image_folder


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_prototypes_unit_norm_and_frozen(tmp_path):
    data = write_image_folder(tmp_path / "data", per_class=16)
    trainer = Trainer(tiny_config(data, tmp_path / "run", "methods.swav.freeze_prototypes_niters=3",
                                  "optim.epochs=1"))
    protos = trainer.model.prototypes.weight
    before = protos.detach().clone()
    trunk_before = trainer.model.trunk.conv1.weight.detach().clone()
    batches = iter(trainer.loader)
    for it in range(5):
        batch = next(batches)
        trainer.step_fn(batch.views, 0.5, it)
        torch.testing.assert_close(protos.norm(dim=1), torch.ones(protos.shape[0]), rtol=0, atol=1e-5)
        if it < 3:
            assert torch.equal(protos.detach(), before), f"prototypes moved while frozen (iteration {it})"
    assert not torch.equal(protos.detach(), before), "prototypes never updated after the freeze"
    assert not torch.equal(trainer.model.trunk.conv1.weight, trunk_before)


def test_resume_is_exact(tmp_path):
    """N steps straight == k steps, stop, resume, N-k more (crossing an epoch boundary)."""
    data = write_image_folder(tmp_path / "data")  # 24 images, batch 8: 3 steps per epoch
    common = ("optim.epochs=3", "methods.swav.queue_length=16", "methods.swav.epoch_queue_starts=1")
    straight = Trainer(tiny_config(data, tmp_path / "a", *common))
    straight.fit()
    assert straight.pos.step == 9

    first = Trainer(tiny_config(data, tmp_path / "b", *common, "train.max_steps=4",
                                "train.checkpoint_every_steps=2"))
    first.fit()
    assert first.pos.step == 4 and first.pos.epoch == 1 and first.pos.batch_in_epoch == 1
    del first
    second = Trainer(tiny_config(data, tmp_path / "b", *common))
    assert second.resume("auto")
    assert second.pos.step == 4
    second.fit()
    a, b = _params(straight.model), _params(second.model)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    assert torch.equal(straight.method.objective.queue.items, second.method.objective.queue.items)
    assert int(straight.method.objective.queue.count) == 8 * 6  # filled from epoch 1 on: 6 steps x 8


def test_checkpoint_contents_and_log(tmp_path):
    data = write_image_folder(tmp_path / "data")
    result = train(tiny_config(data, tmp_path / "run", "optim.epochs=1", "train.keep_checkpoints=2",
                               "train.checkpoint_every_steps=1"))
    paths = ckpt.list_checkpoints(tmp_path / "run")
    assert len(paths) == 2 and paths[-1].name == "ckpt-000000003.pt"
    state = torch.load(paths[-1], weights_only=True)
    assert {"model", "optimizer", "objective", "scaler", "rng", "epoch", "step", "config", "nonfinite"} <= state.keys()
    assert ckpt.verify_digest(paths[-1])  # sha256 sidecar, checked again on load/resume
    assert sorted(p.name for p in paths[-1].parent.iterdir()) == [
        "ckpt-000000002.pt", "ckpt-000000002.pt.sha256", "ckpt-000000003.pt", "ckpt-000000003.pt.sha256"]
    kinds = [r["kind"] for r in read_log(tmp_path / "run")]
    assert kinds.count("step") == 3 and "epoch" in kinds and kinds[-1] == "done"
    assert result.steps == 3 and result.last_loss > 0
    assert (tmp_path / "run" / "config.yaml").is_file()


def test_periodic_knn_and_loader_wait_are_logged(tmp_path):
    data = write_image_folder(tmp_path / "knn" / "train")
    write_image_folder(tmp_path / "knn" / "val", per_class=3, seed=1)
    train(tiny_config(data, tmp_path / "run", "optim.epochs=2", f"eval.knn_data={tmp_path / 'knn'}",
                      "eval.knn_every_epochs=1", "eval.image_size=32"))
    records = read_log(tmp_path / "run")
    periodic = [r for r in records if r["kind"] == "knn" and r.get("periodic")]
    assert [r["epoch"] for r in periodic] == [1, 2]
    assert all(0 <= r["top1"] <= 100 and r["num_val"] == 9 for r in periodic)
    waits = [r["loader_wait_fraction"] for r in records if r["kind"] == "step"]
    assert waits and all(0.0 <= w <= 1.0 for w in waits) and max(waits) > 0.0


@pytest.mark.parametrize("channels_last", [True, False])
def test_final_knn_measures_both_trunks_in_the_run_layout(tmp_path, monkeypatch, channels_last):
    """The end-of-run kNN evaluates the trained trunk and the same trunk at its random initialisation
    in one layout, the run's (``train.channels_last``), and the random one is the seed's init."""
    import swav_fast.train as train_mod
    from swav_fast.eval.knn import KNNResult

    data = write_image_folder(tmp_path / "knn" / "train")
    write_image_folder(tmp_path / "knn" / "val", per_class=3, seed=1)
    seen = []

    def fake_knn(trunk, data, **kw):
        w = trunk.conv1.weight
        seen.append((w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous(),
                     w.detach().clone()))
        return KNNResult(50.0, 20, 0.07, 24, 9, 3)

    monkeypatch.setattr(train_mod, "knn_eval", fake_knn)
    cfg = tiny_config(data, tmp_path / "run", "optim.epochs=1", f"eval.knn_data={tmp_path / 'knn'}",
                      "eval.at_end=true", "eval.image_size=32", f"train.channels_last={str(channels_last).lower()}")
    trainer = Trainer(cfg)
    try:
        torch.manual_seed(0)
        init = train_mod.build_model(cfg).trunk.conv1.weight.detach().clone()
        trainer.fit()
    finally:
        trainer.close()
    assert [layout for layout, _ in seen] == [channels_last, channels_last]
    assert torch.equal(seen[1][1], init) and not torch.equal(seen[0][1], init)


def _all_state(trainer):
    """Online and target networks plus the method's extra state (memory bank, queue, centre, ...)."""
    out = {f"method.{k}": v.detach().clone() for k, v in trainer.method.state_dict().items()}
    for k, v in trainer.method.extra_state_dict().items():
        if isinstance(v, torch.Tensor):
            out[f"extra.{k}"] = v.detach().clone()
    return out


@pytest.mark.parametrize("method", ["instdisc", "moco_v2", "byol", "dino"])
def test_family_resume_is_exact(tmp_path, method):
    """The family's state (memory bank, key queue, EMA target and its schedule, DINO centre) goes
    through the checkpoint: k steps, stop, resume == N steps straight, for every tensor."""
    data = write_image_folder(tmp_path / "data")  # 24 images, batch 8: 3 steps per epoch
    common = (f"train.method={method}", "optim.epochs=2", "methods.instdisc.num_negatives=8",
              "methods.moco_v2.queue_length=32", "methods.moco_v2.shuffle_bn_batch=4",
              "methods.byol.predictor_hidden_dim=16", "methods.dino.out_dim=24",
              "methods.dino.freeze_last_layer_epochs=1")
    straight = Trainer(tiny_config(data, tmp_path / "a", *common))
    straight.fit()
    first = Trainer(tiny_config(data, tmp_path / "b", *common, "train.max_steps=4",
                                "train.checkpoint_every_steps=2"))
    first.fit()
    del first
    second = Trainer(tiny_config(data, tmp_path / "b", *common))
    assert second.resume("auto") and second.pos.step == 4
    second.fit()
    a, b = _all_state(straight), _all_state(second)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{method}: {k} differs after resume"


def test_train_releases_the_loader_workers_when_it_ends(tmp_path):
    """The PIL loader's workers are persistent: a process that trains several times (the learning
    benchmark, the test session) must not keep one set per finished run."""
    import multiprocessing

    data = write_image_folder(tmp_path / "data")
    before = set(multiprocessing.active_children())
    trainer = Trainer(tiny_config(data, tmp_path / "run", "data.workers=1", "optim.epochs=1"))
    try:
        trainer.fit()
        workers = set(multiprocessing.active_children()) - before
        assert workers, "the run had no loader worker to release"
    finally:
        trainer.close()
    trainer.close()  # a second call does nothing more
    for w in workers:
        w.join(timeout=10)
    assert not any(w.is_alive() for w in workers)
