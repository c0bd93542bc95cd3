"""SwAV as one unit: its settings under ``methods.swav`` (old ``swav.*`` keys still load, with a warning;
old checkpoints resume), its collapse signs as :meth:`SwAVMethod.health`."""
from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from swav_fast import checkpoint as ckpt
from swav_fast.config import Config, from_dict, load_config, migrate_moved_keys
from swav_fast.methods import build_method
from swav_fast.train import Trainer
from tests.helpers import tiny_config, write_image_folder

SMALL = ["model.arch=resnet10_half", "model.hidden_dim=32", "model.feat_dim=16", "model.num_prototypes=16",
         "data.crops.num_crops=[2]", "data.crops.size_crops=[32]", "data.crops.min_scale_crops=[0.2]",
         "data.crops.max_scale_crops=[1.0]"]


# -- settings under methods.swav -----------------------------------------------------------------------
def test_old_swav_keys_load_with_a_warning(tmp_path, caplog):
    recipe = tmp_path / "old.yaml"
    recipe.write_text("swav: {queue_length: 128, epsilon: 0.03}\noptim: {batch_size: 64}\n")
    with caplog.at_level(logging.WARNING, logger="swav_fast"):
        cfg = load_config(str(recipe), ["swav.temperature=0.2"])
    assert (cfg.methods.swav.queue_length, cfg.methods.swav.epsilon, cfg.methods.swav.temperature) == \
        (128, 0.03, 0.2)
    warnings = [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
    assert len(warnings) == 2 and all(len(w.splitlines()) == 1 for w in warnings)
    assert str(recipe) in warnings[0] and "swav.queue_length" in warnings[0] and "methods.swav" in warnings[0]
    assert "swav.temperature=0.2" in warnings[1]
    assert not hasattr(cfg, "swav")


def test_later_source_wins_whichever_name_it_uses(caplog):
    """An old-name override after a new-name recipe value (and vice versa) wins, as any later override."""
    cfg = load_config("swav_400ep_bs256", ["swav.queue_length=0"])
    assert cfg.methods.swav.queue_length == 0 and cfg.methods.swav.freeze_prototypes_niters == 5005
    cfg = load_config(None, ["swav.queue_length=256", "methods.swav.queue_length=512"])
    assert cfg.methods.swav.queue_length == 512
    # within one mapping the new place wins over the old one
    data = migrate_moved_keys({"swav": {"epsilon": 0.1, "temperature": 0.3},
                               "methods": {"swav": {"epsilon": 0.2}}})
    assert data == {"methods": {"swav": {"epsilon": 0.2, "temperature": 0.3}}}


def test_no_warning_for_new_keys(caplog):
    with caplog.at_level(logging.WARNING, logger="swav_fast"):
        load_config("quick", ["methods.swav.epsilon=0.04"])
    assert "deprecated" not in caplog.text


def test_swav_settings_are_checked_with_their_new_names():
    from swav_fast.errors import ConfigError

    with pytest.raises(ConfigError, match=r"methods\.swav\.epsilon=0\.0 must be > 0"):
        load_config(None, ["methods.swav.epsilon=0"])
    with pytest.raises(ConfigError, match=r"methods\.swav\.queue_length=-1 must be >= 0"):
        load_config(None, ["swav.queue_length=-1"])  # the old name is checked at its new place


def test_checkpoint_written_before_the_move_resumes(tmp_path, caplog):
    """A checkpoint whose saved config has the top-level ``swav`` section (as written before the move),
    resumed with the old ``swav.*`` overrides, continues exactly like a run that never stopped."""
    data = write_image_folder(tmp_path / "data")  # 24 images, batch 8: 3 steps per epoch
    common = ("optim.epochs=2", "methods.swav.queue_length=16", "methods.swav.epoch_queue_starts=1")
    straight = Trainer(tiny_config(data, tmp_path / "a", *common))
    straight.fit()
    first = Trainer(tiny_config(data, tmp_path / "b", *common, "train.max_steps=4",
                                "train.checkpoint_every_steps=2"))
    first.fit()
    del first
    path = ckpt.list_checkpoints(tmp_path / "b")[-1]
    state = ckpt.load_checkpoint(path)
    state["config"]["swav"] = state["config"]["methods"].pop("swav")  # the layout before the move
    ckpt.atomic_save(state, path, checksum=True)
    with caplog.at_level(logging.WARNING, logger="swav_fast"):
        saved = from_dict(Config, state["config"])  # what `eval` and `export` read from a checkpoint
        old_names = (o.replace("methods.swav.", "swav.") for o in common)
        second = Trainer(tiny_config(data, tmp_path / "b", *old_names))
    assert saved.methods.swav.queue_length == 16 and "deprecated" in caplog.text
    assert second.resume("auto") and second.pos.step == 4
    second.fit()
    a, b = straight.model.state_dict(), second.model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resuming the old checkpoint"
    assert torch.equal(straight.method.objective.queue.items, second.method.objective.queue.items)


# -- health ----------------------------------------------------------------------------------------------
def _method(freeze: int = 5):
    torch.manual_seed(0)
    cfg = load_config(None, [*SMALL, f"methods.swav.freeze_prototypes_niters={freeze}"])
    return build_method("swav", cfg)


def test_health_is_silent_while_the_prototypes_are_frozen():
    method = _method(freeze=5)
    method.last_scores = torch.zeros(2 * 8, 16)  # collapsed, but too early to tell
    assert method.health(5, 3.0) is None
    assert method.health(6, float("nan")) is None  # the non-finite guard reports that
    assert _method().health(10, 3.0) is None  # no step yet: no scores


def test_health_reports_collapsed_and_healthy_codes():
    method = _method(freeze=0)
    g = torch.Generator().manual_seed(0)
    healthy = torch.nn.functional.normalize(torch.randn(2 * 32, 16, generator=g), dim=-1)
    method.last_scores = healthy
    report = method.health(1, 2.5)
    assert report is not None and report.ok and report.kind == "collapse"
    assert report.signals["prototypes_used"] > 1 and 0 < report.signals["prediction_entropy"] < 0.99
    method.last_scores = healthy[:1].expand(2 * 32, 16)  # every sample scores the prototypes alike
    report = method.health(1, 2.7)
    assert not report.ok and report.signals["prototypes_used"] == 1 and report.signals["samples"] == 32
    assert report.signals["ln_k"] == pytest.approx(math.log(16))
    assert "one of 16 prototypes" in report.message
    assert "methods.swav.epsilon" in report.message
    assert report.signals["remedies"] and report.signals["signs"]
    method.last_scores = 1e-4 * healthy  # uniform predictions: hedging at ln K
    report = method.health(1, math.log(16))
    assert not report.ok and any("uniform" in s for s in report.signals["signs"])


# -- float32 scores and loss under bf16 autocast ------------------------------------------------------------
def _log_softmax64(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def ref_swapped_loss(scores, codes, assign, tau):
    """Float64 reference from the formula: mean over assigned views i and the other views v of
    -mean_b sum_k q_i[b, k] log softmax(s_v[b] / tau)[k] (main_swav.py's subloss)."""
    num_views = scores.shape[0]
    total = 0.0
    for j, i in enumerate(assign):
        for v in range(num_views):
            if v != i:
                total += -np.mean(np.sum(codes[j] * _log_softmax64(scores[v] / tau), axis=-1))
    return total / (num_views - 1) / len(assign)


def test_prototype_scores_are_float32_under_bf16_autocast():
    from swav_fast.models.heads import Prototypes

    g = torch.Generator().manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(64, 128, generator=g), dim=1)
    protos = Prototypes(128, 3000)
    ref = z.double() @ protos.weight.detach().double().t()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = protos(z)
        bf16 = torch.nn.functional.linear(z, protos.weight.detach())  # what an autocast linear gives
    assert scores.dtype == torch.float32 and bf16.dtype == torch.bfloat16
    err = float((scores.detach().double() - ref).abs().max() / ref.abs().max())
    assert err < 1e-6, err
    assert float((bf16.double() - ref).abs().max() / ref.abs().max()) > 1e-3  # the error fixed here
    scores.sum().backward()  # gradients reach the prototypes through the float32 product
    assert protos.weight.grad is not None and protos.weight.grad.dtype == torch.float32


def test_swav_forward_under_bf16_autocast_has_float32_scores_codes_and_loss():
    method = _method(freeze=0)
    views = [torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(v)) for v in range(2)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = method(views)
        z = method.model(views)[0]
    assert loss.dtype == torch.float32 and method.last_scores.dtype == torch.float32
    assert z.dtype == torch.float32  # the embeddings are normalised in float32 too
    scores = method.last_scores
    codes = method.objective.codes(z.float(), scores.view(2, 8, -1), method.model.prototypes.weight)
    assert codes.dtype == torch.float32
    ref = ref_swapped_loss(scores.view(2, 8, -1).double().numpy(), codes.double().numpy(), [0, 1], 0.1)
    assert math.isclose(loss.item(), ref, rel_tol=1e-6)


@pytest.mark.parametrize("fused", [False, True])
def test_swapped_loss_keeps_float32_accuracy_over_many_terms(fused):
    """2 + 6 views, batch 64, K = 3000 (768k terms per pair of views): the float32 loss equals the float64
    formula to float32 rounding, under bf16 autocast, in the eager and the fused (compile/graph) paths."""
    from swav_fast.losses import sinkhorn_knopp, swapped_prediction_loss
    from swav_fast.losses.fused import swapped_loss_from_codes

    g = torch.Generator().manual_seed(1)
    scores = torch.nn.functional.normalize(torch.randn(8, 64, 3000, generator=g), dim=-1) * 3
    codes = torch.stack([sinkhorn_knopp(scores[i], 0.05, 3) for i in (0, 1)])
    loss_fn = swapped_loss_from_codes if fused else swapped_prediction_loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(scores, codes, [0, 1], 0.1)
    assert loss.dtype == torch.float32
    ref = ref_swapped_loss(scores.double().numpy(), codes.double().numpy(), [0, 1], 0.1)
    # 1e-7: one float32 rounding of the result (a float32 sum of the terms is off by 2e-7 here, bf16 4e-4)
    assert abs(loss.item() - ref) / abs(ref) < 1e-7, (loss.item(), ref)
