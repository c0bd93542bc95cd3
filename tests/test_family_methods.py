"""The method family on the Method contract: shared pieces (EMA, memory bank, key queue), each
method's forward / backward / hooks on a tiny trunk, and a short training loop per method that keeps
the embedding from collapsing."""
import copy
import logging
import math

import pytest
import torch
import torch.nn.functional as F

from swav_fast.config import load_config
from swav_fast.ddp import CPUSyncBatchNorm, convert_sync_batchnorm
from swav_fast.errors import ConfigError, DataError
from swav_fast.memory import KeyQueue, MemoryBank
from swav_fast.methods import barlow, byol, dino, instdisc, moco, simclr, simsiam  # noqa: F401 (register)
from swav_fast.methods.base import available_methods, build_method
from swav_fast.methods.configs import (BYOLConfig, DINOConfig, InstDiscConfig, MethodsConfig, MoCoV2Config,
                                       MoCoV3Config, estimated_total_steps, method_config)
from swav_fast.methods.momentum import EMATarget, MomentumSchedule, cosine_momentum, ema_update_
from swav_fast.models.predictor import DINOHead, EncoderNet, MLPHead
from swav_fast.step import TrainStep
from swav_fast.run import build_optimizer, check_config

METHODS = ["instdisc", "moco_v2", "moco_v3", "simclr", "byol", "simsiam", "barlow_twins", "dino"]
EMA_METHODS = ["moco_v2", "moco_v3", "byol", "dino"]
BATCH = 8


def family_config(num_crops=(2, 2), sizes=(32, 16), batch=BATCH):
    """resnet10_half, small heads, quick-recipe-like method settings."""
    cfg = load_config(None, [
        "model.arch=resnet10_half", "model.hidden_dim=64", "model.feat_dim=32",
        f"data.crops.num_crops={list(num_crops)}", f"data.crops.size_crops={list(sizes)}",
        f"data.crops.min_scale_crops={[0.2] * len(num_crops)}",
        f"data.crops.max_scale_crops={[1.0] * len(num_crops)}",
        f"optim.batch_size={batch}", "optim.epochs=2", "data.synthetic.train_images=40"])
    m = MethodsConfig()
    m.instdisc = InstDiscConfig(num_negatives=16, z_momentum=0.9)
    m.moco_v2 = MoCoV2Config(queue_length=64, momentum=0.99, shuffle_bn_batch=4)
    m.moco_v3 = MoCoV3Config(predictor_hidden_dim=64)
    m.byol = BYOLConfig(predictor_hidden_dim=64)
    m.simsiam.predictor_hidden_dim = 16
    m.dino = DINOConfig(out_dim=48, base_momentum=0.99, freeze_last_layer_epochs=0)
    cfg.methods = m
    return cfg


def views_for(cfg, batch=BATCH, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n, s in zip(cfg.data.crops.num_crops, cfg.data.crops.size_crops):
        out += [torch.randn(batch, 3, s, s, generator=g) for _ in range(n)]
    return out


def target_net(method):
    """The EMA target network of ``method``, or None."""
    target = getattr(method, "target", None)
    return target.net if target is not None else None


# ---- EMA --------------------------------------------------------------------------------------


def test_cosine_momentum_schedule():
    base, k = 0.996, 100
    for step, want in [(0, base), (50, (base + 1) / 2), (100, 1.0), (250, 1.0), (-3, base)]:
        got = cosine_momentum(torch.tensor(step), k, base)
        assert got.dtype == torch.float32 and got.dim() == 0
        assert math.isclose(got.item(), want, rel_tol=1e-6)
    want = 1 - (1 - base) * (math.cos(math.pi * 30 / k) + 1) / 2
    assert math.isclose(cosine_momentum(torch.tensor(30), k, base).item(), want, rel_tol=1e-6)
    assert cosine_momentum(torch.tensor(30), 0, base).item() == pytest.approx(base)  # K unknown
    assert cosine_momentum(torch.tensor(30), k, 0.999, 0.999).item() == pytest.approx(0.999)  # constant


def test_momentum_schedule_total_steps_is_state():
    s = MomentumSchedule(0.99)
    s.set_total_steps(10)
    assert s(torch.tensor(10)).item() == pytest.approx(1.0)
    s2 = MomentumSchedule(0.99)
    s2.load_state_dict(s.state_dict())
    assert int(s2.total_steps) == 10
    with pytest.raises(ConfigError, match="momentum"):
        MomentumSchedule(1.5)


def test_ema_update_formula_params_only_and_predictor_skipped():
    torch.manual_seed(0)
    online = EncoderNet("resnet10_half", lambda d: MLPHead(d, 16, 8), predictor=MLPHead(8, 16, 8))
    ema = EMATarget(online, 0.9, drop=("predictor",))
    assert ema.net.predictor is None
    assert all(not p.requires_grad for p in ema.net.parameters())
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
        for b in online.buffers():
            if b.is_floating_point():
                b.add_(1.0)
    before = copy.deepcopy(ema.net.state_dict())
    ema.update_(online, torch.tensor(0))
    params = dict(ema.net.named_parameters())
    online_params = dict(online.named_parameters())
    for name, old in before.items():
        new = ema.net.state_dict()[name]
        if name in params:
            assert torch.allclose(new, 0.9 * old + 0.1 * online_params[name].detach(), atol=1e-6), name
        else:  # buffers (BN running statistics) are each network's own
            assert torch.equal(new, old), name


def test_ema_update_accepts_python_float_and_rejects_mismatch():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    want = 0.25 * a.weight.detach() + 0.75 * b.weight.detach()
    ema_update_(a, b, 0.25)
    assert torch.allclose(a.weight, want)
    with pytest.raises(ValueError, match="shape"):
        ema_update_(torch.nn.Linear(3, 2), torch.nn.Linear(3, 4), 0.5)


# ---- memory bank and key queue ----------------------------------------------------------------


def test_memory_bank_momentum_update_by_index():
    bank = MemoryBank(10, 4, momentum=0.5)  # starts as lemniscate's (test_method_defaults.py)
    old = bank.bank.clone()
    idx = torch.tensor([7, 2])
    feats = F.normalize(torch.randn(2, 4), dim=1)
    bank.update_(idx, feats)
    want = F.normalize(0.5 * old[idx] + 0.5 * feats, dim=1)
    assert torch.allclose(bank.bank[idx], want, atol=1e-6)
    others = [i for i in range(10) if i not in (7, 2)]
    assert torch.equal(bank.bank[others], old[others])


def test_memory_bank_negatives_are_uniform_over_the_other_rows():
    torch.manual_seed(0)
    n, draws = 10, 9000
    bank = MemoryBank(n, 3)
    own = torch.full((draws,), 4)
    noise = bank.sample_excluding(own, 1).flatten()
    assert not (noise == 4).any()
    counts = torch.bincount(noise, minlength=n).double()
    p = 1 / (n - 1)  # each other row: Binomial(draws, 1/9), sd ~30; allow 5 sd
    sd = math.sqrt(draws * p * (1 - p))
    assert ((counts[torch.arange(n) != 4] - draws * p).abs() < 5 * sd).all()
    plain = bank.sample(4, 5)
    assert plain.shape == (4, 5) and plain.min() >= 0 and plain.max() < n


def test_memory_bank_resize_and_state():
    bank = MemoryBank(3, 4)
    bank.resize_(7)
    assert bank.bank.shape == (7, 4) and "bank" in bank.state_dict()
    with pytest.raises(ConfigError, match="size"):
        MemoryBank(0, 4)


def test_key_queue_is_a_ring_buffer():
    q = KeyQueue(length=5, dim=2)
    for i in range(1, 4):  # pushes of 2: slots 0-1, 2-3, 4 and (wrapped) 0
        q.push(torch.full((2, 2), float(i)))
    assert q.keys[:, 0].tolist() == [3, 1, 2, 2, 3]
    assert int(q.ptr) == 1
    q2 = KeyQueue(5, 2)
    q2.load_state_dict(q.state_dict())
    assert torch.equal(q2.keys, q.keys) and int(q2.ptr) == 1
    with pytest.raises(ConfigError, match="longer"):
        q.push(torch.zeros(6, 2))


# ---- configs ----------------------------------------------------------------------------------


def test_paper_defaults():
    m = MethodsConfig()
    assert (m.instdisc.memory_momentum, m.instdisc.num_negatives, m.instdisc.temperature) == (0.5, 4096, 0.07)
    assert (m.moco_v2.momentum, m.moco_v2.queue_length, m.moco_v2.temperature) == (0.999, 65536, 0.2)
    assert (m.byol.base_momentum, m.byol.final_momentum) == (0.996, 1.0)
    assert m.barlow_twins.lambd == 5e-3
    assert (m.dino.teacher_temp, m.dino.student_temp, m.dino.center_momentum) == (0.04, 0.1, 0.9)


@pytest.mark.parametrize("make,key", [
    (lambda: MoCoV2Config(temperature=0.0), "moco_v2.temperature"),
    (lambda: BYOLConfig(base_momentum=1.5), "byol.base_momentum"),
    (lambda: InstDiscConfig(memory_momentum=1.0), "instdisc.memory_momentum"),
    (lambda: DINOConfig(out_dim=0), "dino.out_dim"),
])
def test_bad_method_config_names_the_key(make, key):
    with pytest.raises(ConfigError, match=key):
        make()


def test_method_config_falls_back_to_defaults():
    assert method_config(type("Bare", (), {})(), "byol") == BYOLConfig()
    with pytest.raises(ConfigError, match="unknown methods section"):
        method_config(family_config(), "nope")


def test_factories_reject_impossible_settings():
    cfg = family_config()
    cfg.methods.moco_v2.queue_length = 4  # one step pushes 8 keys
    with pytest.raises(ConfigError, match="queue_length"):
        build_method("moco_v2", cfg)
    single = family_config(num_crops=(1,), sizes=(32,))
    with pytest.raises(ConfigError, match="at least 2 views"):
        build_method("byol", single)


@pytest.mark.parametrize("cls, name", [(byol.BYOL, "BYOL"), (simsiam.SimSiam, "SimSiam"),
                                        (moco.MoCoV3, "MoCo v3")])
def test_predictor_methods_reject_a_network_without_one(cls, name):
    net = EncoderNet("resnet10_half", lambda d: MLPHead(d, 16, 8, 2))
    with pytest.raises(ValueError, match=f"{name} needs an online predictor"):
        cls(net)


def test_one_view_only_for_instdisc():
    """The registry's view minimum is checked where the run is composed (check_config), before any work."""
    one = ["data.crops.num_crops=[1]", "data.crops.size_crops=[32]", "data.crops.min_scale_crops=[0.2]",
           "data.crops.max_scale_crops=[1.0]"]
    check_config(load_config(None, ["train.method=instdisc", *one]))
    for method in METHODS + ["swav"]:
        if method != "instdisc":
            with pytest.raises(ConfigError, match=f"at least 2 views for train.method={method}"):
                check_config(load_config(None, [f"train.method={method}", *one]))


def test_total_steps_estimate():
    cfg = family_config()
    assert estimated_total_steps(cfg) == 2 * (40 // BATCH)
    assert build_method("byol", cfg).target.schedule.total_steps.item() == 10
    cfg.data.path = "/somewhere"
    assert estimated_total_steps(cfg) == 0


# ---- every method on the contract -------------------------------------------------------------


@pytest.mark.parametrize("name", METHODS)
def test_forward_backward_hooks(name):
    torch.manual_seed(0)
    cfg = family_config()
    method = build_method(name, cfg)
    method.train()
    assert method.name == name and hasattr(method.model, "trunk")
    if hasattr(method, "on_train_start"):
        method.on_train_start(40, 10)
    method.on_epoch_start(0)
    opt = torch.optim.SGD(method.trainable().parameters(), lr=0.1)
    views, indices = views_for(cfg), torch.arange(BATCH) * 3
    loss = method(views, indices)
    assert loss.dim() == 0 and loss.dtype == torch.float32 and torch.isfinite(loss)
    opt.zero_grad()
    loss.backward()
    trunk_grads = [p.grad for p in method.model.trunk.parameters()]
    assert all(g is not None for g in trunk_grads) and sum(g.abs().sum() for g in trunk_grads) > 0
    target = target_net(method)
    online_ids = {id(p) for p in method.trainable().parameters()}
    for p in method.parameters():
        if id(p) not in online_ids:  # target networks: frozen, no gradient
            assert not p.requires_grad and p.grad is None
    step = torch.tensor(0)
    method.before_update(step)
    before = copy.deepcopy(target.state_dict()) if target is not None else None
    opt.step()
    if target is not None:  # the optimiser does not touch the target ...
        for k, v in target.state_dict().items():
            assert torch.equal(v, before[k]), k
        m = method.target.schedule(step).item()
        method.after_update(step)  # ... the EMA does
        online = dict(method.model.named_parameters())
        for k, p in target.named_parameters():
            want = m * before[k] + (1 - m) * online[k].detach()
            assert torch.allclose(p, want, atol=1e-6), k
        assert any(not torch.equal(p, before[k]) for k, p in target.named_parameters())
    else:
        method.after_update(step)
    assert torch.isfinite(method(views, indices))  # a second step works after the hooks


@pytest.mark.parametrize("name", METHODS)
def test_forward_under_bf16_autocast(name):
    torch.manual_seed(0)
    cfg = family_config(num_crops=(2,), sizes=(32,))
    method = build_method(name, cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = method(views_for(cfg), torch.arange(BATCH))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


@pytest.mark.parametrize("name", EMA_METHODS + ["instdisc"])
def test_extra_state_round_trip(name):
    torch.manual_seed(0)
    cfg = family_config()
    a = build_method(name, cfg)
    a(views_for(cfg), torch.arange(BATCH))
    a.after_update(torch.tensor(0))
    b = build_method(name, cfg)
    extra = a.extra_state_dict()
    assert extra and not any(k.startswith("model.") for k in extra)
    b.load_extra_state_dict(extra)
    for k, v in b.extra_state_dict().items():
        assert torch.equal(v, extra[k]), k


def test_moco_v2_queue_receives_the_keys_after_the_update():
    torch.manual_seed(0)
    cfg = family_config(num_crops=(2,), sizes=(32,))
    method = build_method("moco_v2", cfg)
    old = method.queue.keys.clone()
    method(views_for(cfg), None)
    assert torch.equal(method.queue.keys, old)  # forward leaves the queue alone (its keys are in the graph)
    pending = method._pending_keys.clone()
    method.after_update(torch.tensor(0))
    assert int(method.queue.ptr) == BATCH  # one key view (the paper's asymmetric loss)
    assert torch.allclose(method.queue.keys[:BATCH], pending)
    assert torch.allclose(method.queue.keys[:BATCH].norm(dim=1), torch.ones(BATCH))


def test_moco_v2_shuffle_bn_restores_the_sample_order():
    """In eval mode batch norm has no batch dependence, so shuffled sub-batch keys must equal the
    plain keys sample for sample: the un-shuffle is right."""
    torch.manual_seed(0)
    cfg = family_config(num_crops=(2,), sizes=(32,))
    method = build_method("moco_v2", cfg).eval()
    view = views_for(cfg)[1]
    assert method.shuffle_bn_batch * 2 <= BATCH  # really split into sub-batches
    plain = F.normalize(method.target([view]).float(), dim=1)
    assert torch.allclose(method.keys(view), plain, atol=1e-5)


def test_moco_v2_symmetric_uses_both_globals_as_keys():
    assert moco.moco_v2_key_views(2, 2, symmetric=False) == [1]
    assert moco.moco_v2_key_views(4, 2, symmetric=True) == [0, 1]
    assert moco.moco_v2_key_views(3, 1, symmetric=False) == [0]


def test_instdisc_memory_and_normaliser():
    torch.manual_seed(0)
    cfg = family_config(num_crops=(2,), sizes=(32,))
    cfg.methods.instdisc = InstDiscConfig(num_negatives=16)  # the paper: Z fixed after the first batch
    method = build_method("instdisc", cfg)
    assert method.memory.size == 40  # the synthetic set's size, known from the config
    method.on_train_start(37, 10)
    assert method.memory.size == 37
    with pytest.raises(DataError, match="index"):
        method(views_for(cfg), None)
    indices = torch.tensor([0, 3, 5, 8, 13, 21, 34, 36])
    old = method.memory.bank.clone()
    assert torch.isnan(method.log_z)
    method(views_for(cfg), indices)
    first_z = method.log_z.clone()
    assert torch.isfinite(first_z)
    method.after_update(torch.tensor(0))
    changed = (method.memory.bank != old).any(dim=1)
    assert changed[indices].all() and changed.sum() == len(indices)
    method(views_for(cfg, seed=1), indices)
    assert torch.equal(method.log_z, first_z)
    moving = build_method("instdisc", family_config(num_crops=(2,), sizes=(32,)))  # z_momentum 0.9
    moving(views_for(cfg), indices)
    z0 = moving.log_z.clone()
    moving(views_for(cfg, seed=1), indices)
    assert not torch.equal(moving.log_z, z0)


def test_instdisc_exact_softmax_over_the_bank():
    torch.manual_seed(0)
    cfg = family_config(num_crops=(2,), sizes=(32,))
    cfg.methods.instdisc = InstDiscConfig(loss="softmax")
    method = build_method("instdisc", cfg)
    method.on_train_start(37, 10)
    indices = torch.tensor([0, 3, 5, 8, 13, 21, 34, 36])
    views = views_for(cfg)
    bank = method.memory.bank.clone().double()
    loss = method(views, indices)
    with torch.no_grad():  # float64 from the formula: -mean over views and samples of log P(i_b | f_b)
        z = F.normalize(method.model(views).double(), dim=1).reshape(len(views), len(indices), -1)
        logits = z @ bank.T / cfg.methods.instdisc.temperature
        ref = -(logits[:, torch.arange(len(indices)), indices] - torch.logsumexp(logits, dim=2)).mean()
    assert math.isclose(loss.item(), ref.item(), rel_tol=1e-5)
    # log_z: the exact normaliser log sum_j exp(v_j . f / T), averaged over views and samples
    assert math.isclose(method.log_z.item(), torch.logsumexp(logits, dim=2).mean().item(), rel_tol=1e-5)
    old = method.memory.bank.clone()
    loss.backward()
    assert all(p.grad is not None for p in method.model.parameters() if p.requires_grad)
    method.after_update(torch.tensor(0))
    changed = (method.memory.bank != old).any(dim=1)
    assert changed[indices].all() and changed.sum() == len(indices)
    with pytest.raises(ConfigError, match="methods.instdisc.loss"):
        InstDiscConfig(loss="exact")


def test_instdisc_softmax_warns_about_the_nce_settings_it_ignores(caplog):
    cfg = family_config(num_crops=(2,), sizes=(32,))
    for settings, unused in (({}, []), ({"num_negatives": 64}, ["num_negatives=64"]),
                             ({"num_negatives": 64, "z_momentum": 0.9}, ["num_negatives=64", "z_momentum=0.9"])):
        caplog.clear()
        cfg.methods.instdisc = InstDiscConfig(loss="softmax", **settings)
        with caplog.at_level(logging.WARNING, logger="swav_fast"):
            build_method("instdisc", cfg)
        lines = [r.getMessage() for r in caplog.records if "unused with loss=softmax" in r.getMessage()]
        assert len(lines) == (1 if unused else 0) and all(u in lines[0] for u in unused), lines
    caplog.clear()
    cfg.methods.instdisc = InstDiscConfig(loss="nce", num_negatives=64, z_momentum=0.9)
    with caplog.at_level(logging.WARNING, logger="swav_fast"):
        build_method("instdisc", cfg)
    assert not [r for r in caplog.records if "unused" in r.getMessage()]


def test_instdisc_explicit_memory_size_must_hold_the_dataset():
    cfg = family_config()
    cfg.methods.instdisc = InstDiscConfig(memory_size=20)
    method = build_method("instdisc", cfg)
    with pytest.raises(ConfigError, match="memory_size"):
        method.on_train_start(40, 10)


def test_dino_centre_temperature_and_last_layer_freeze():
    torch.manual_seed(0)
    cfg = family_config()
    cfg.methods.dino = DINOConfig(out_dim=48, warmup_teacher_temp=0.02, teacher_temp=0.06,
                                  warmup_teacher_temp_epochs=3, freeze_last_layer_epochs=1, clip_grad=0.0)
    method = build_method("dino", cfg)
    temps = [dino.teacher_temperature(e, 0.06, 0.02, 3) for e in range(4)]
    assert temps == pytest.approx([0.02, 0.04, 0.06, 0.06])
    method.on_epoch_start(1)
    assert method.teacher_temp.item() == pytest.approx(0.04)
    # the last layer is frozen for one epoch: 40 images // batch 8 = 5 iterations, 7 once the
    # trainer reports 14 steps over the 2 epochs
    (params, until), = method.frozen_parameters()
    assert until == 5
    assert [id(p) for p in params] == [id(p) for p in method.model.head.last_layer.parameters()]
    method.on_train_start(40, 14)
    assert method.frozen_parameters()[0][1] == 7
    views = views_for(cfg)
    method(views)
    with torch.no_grad():
        teacher = method.target(views[:2]).float()
    old_center = method.center.clone()
    method.after_update(torch.tensor(0))
    want = 0.9 * old_center + 0.1 * teacher.mean(dim=0)
    assert torch.allclose(method.center, want, atol=1e-5)
    cfg.methods.dino.freeze_last_layer_epochs = 0
    assert build_method("dino", cfg).frozen_parameters() == []


def test_dino_clips_each_gradient():
    torch.manual_seed(0)
    cfg = family_config()
    cfg.methods.dino = DINOConfig(out_dim=48, clip_grad=1e-3, freeze_last_layer_epochs=0)
    method = build_method("dino", cfg)
    (method(views_for(cfg)) * 1e3).backward()
    method.before_update(torch.tensor(0))
    norms = [p.grad.norm() for p in method.model.parameters() if p.grad is not None]
    assert max(norms) <= 1e-3 * (1 + 1e-4) and max(norms) > 0.5e-3


def test_dino_head_has_unit_norm_last_layer():
    head = DINOHead(16, 32, 8, 20, num_layers=3)
    with torch.no_grad():
        head.last_layer.weight.mul_(5.0)
    h = torch.randn(4, 16)
    bottleneck = F.normalize(head.mlp(h), dim=1)
    assert torch.allclose(head(h), bottleneck @ F.normalize(head.last_layer.weight, dim=1).t(), atol=1e-6)
    assert head(h).abs().max() <= 1.0 + 1e-6  # cosines


# ---- collapse: a short run keeps the embedding spread out -------------------------------------


def _images(n=48, size=40, seed=0):
    """Smooth random colour patterns: each image differs from the others at every scale."""
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(n, 3, 4, 4, generator=g) * 2 - 1, size=size, mode="bilinear",
                         align_corners=False)


def _augment(images, out, g):
    """Random crop, flip, mild colour scale / shift and pixel noise."""
    n, _, size, _ = images.shape
    views = []
    for i in range(n):
        y, x = torch.randint(0, size - out + 1, (2,), generator=g).tolist()
        v = images[i, :, y:y + out, x:x + out]
        if torch.rand((), generator=g) < 0.5:
            v = v.flip(-1)
        v = v * (0.9 + 0.2 * torch.rand(3, 1, 1, generator=g)) + 0.05 * torch.randn(3, 1, 1, generator=g)
        views.append(v + 0.05 * torch.randn(v.shape, generator=g))
    return torch.stack(views)


def spread(z):
    """Per-dimension std of the L2-normalised embeddings ``z`` ``[N, D]``, times sqrt(D): about 1
    when they spread over the sphere, 0 when every image maps to the same point (collapse)."""
    z = F.normalize(z.float(), dim=1)
    return (z.std(dim=0).mean() * math.sqrt(z.shape[1])).item()


class _AlignOnly(simclr.SimCLR):
    """Negative control: pull two views together with no negatives, predictor or stop-gradient."""

    def forward(self, views, indices=None):
        z = F.normalize(self.model(views).float(), dim=1)
        z = z.reshape(len(views), -1, z.shape[-1])
        return (z[0] - z[1]).pow(2).sum(dim=1).mean()


def _short_run(method, steps=20, lr=0.05, batch=16):
    """SGD with a linear warm-up, 2 x 32 px views of 16 of the 48 images per step."""
    images = _images()
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD(method.trainable().parameters(), lr=lr, momentum=0.9, weight_decay=1e-5)
    method.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * (step + 1) / steps
        idx = torch.randperm(len(images), generator=g)[:batch]
        views = [_augment(images[idx], 32, g) for _ in range(2)]
        loss = method(views, idx)
        assert torch.isfinite(loss), f"step {step}: loss {loss.item()}"
        opt.zero_grad()
        loss.backward()
        method.before_update(torch.tensor(step))
        opt.step()
        method.after_update(torch.tensor(step))
    centre = images[:, :, 4:36, 4:36]
    with torch.no_grad():  # training mode: batch-norm statistics of the batch, as the loss saw them
        return spread(method.model([centre])), spread(method.model.trunk(centre))


# Seeds 0-2: the head's spread stays >= 0.2 (MoCo v2 and DINO dip most while their target networks
# catch up) and the trunk's >= 0.5; the control's head ends at ~0.04. SimSiam's and MoCo v3's heads
# end in an affine-free BN, so their head spread is ~1 by construction; the trunk check covers them.
SPREAD_FLOOR = 0.12
TRUNK_SPREAD_FLOOR = 0.3


def _collapse_config():
    cfg = family_config(num_crops=(2,), sizes=(32,), batch=16)
    cfg.model.hidden_dim, cfg.model.feat_dim = 128, 64
    cfg.methods.instdisc.memory_size = 48
    cfg.methods.moco_v2 = MoCoV2Config(queue_length=256, momentum=0.99, shuffle_bn_batch=8)
    cfg.methods.dino = DINOConfig(out_dim=256, base_momentum=0.99, freeze_last_layer_epochs=0)
    cfg.methods.byol.predictor_hidden_dim = cfg.methods.moco_v3.predictor_hidden_dim = 128
    cfg.methods.simsiam.predictor_hidden_dim = 32
    return cfg


@pytest.mark.parametrize("name", METHODS)
def test_short_run_keeps_embedding_spread(name):
    torch.manual_seed(0)
    method = build_method(name, _collapse_config())
    head, trunk = _short_run(method)
    assert head > SPREAD_FLOOR, f"{name}: embedding spread {head:.3f} (collapse)"
    assert trunk > TRUNK_SPREAD_FLOOR, f"{name}: trunk feature spread {trunk:.3f} (collapse)"


def test_spread_detects_a_collapsing_objective():
    """The same loop and measure flag the textbook collapse, so the test above can fail."""
    torch.manual_seed(0)
    control = _AlignOnly(build_method("moco_v2", _collapse_config()).model)  # head without BN
    head, _ = _short_run(control)
    assert head < SPREAD_FLOOR


@pytest.mark.parametrize("name", available_methods())
def test_sync_bn_converts_online_and_target_networks_but_moco_v2_keys(name):
    """``model.sync_bn``: every batch norm becomes synchronised (targets too, as MoCo v3, BYOL and DINO
    do), except MoCo v2's key encoder, whose shuffle BN needs per-rank statistics; the EMA pairing of
    online and target parameters survives the conversion."""
    method = build_method(name, family_config())
    before = {k: p for k, p in method.named_parameters()}
    method.convert_sync_batchnorm_(convert_sync_batchnorm)
    norms = [(k, type(m)) for k, m in method.named_modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms, "every method's ResNet trunk has batch norms"
    local = {k for k, t in norms if t is not CPUSyncBatchNorm}
    if name == "moco_v2":
        assert local and all(k.startswith("target.") for k in local)
        assert not any(k.startswith("model.") for k in local)
    else:
        assert local == set()
    after = dict(method.named_parameters())
    assert after.keys() == before.keys() and all(after[k] is p for k, p in before.items())


# ---- step modes -------------------------------------------------------------------------------------
def _family_steps(name: str, modes: tuple[str, ...], device: torch.device, **options) -> list[TrainStep]:
    """One TrainStep per mode over identical copies of method ``name`` (the trainer's optimiser)."""
    cfg = family_config()
    steps = []
    for mode in modes:
        torch.manual_seed(0)
        method = build_method(name, cfg)
        method.on_train_start(4 * BATCH, 20)
        method = method.to(device)
        steps.append(TrainStep(method, build_optimizer(cfg, method.trainable()), device, "fp32", mode=mode,
                               compile_options=options if mode != "eager" else None))
    return steps


def _run_alike(steps: list[TrainStep], num_steps: int, device: torch.device) -> list[list[float]]:
    """The same batches, indices and random draws (MoCo v2's shuffle) for every step object."""
    losses = []
    for step in steps:
        torch.manual_seed(1)
        losses.append([float(step([v.to(device) for v in views_for(family_config(), seed=i)], 0.1, i,
                                  torch.arange(BATCH) + BATCH * (i % 4)))
                       for i in range(num_steps)])
    return losses


def _assert_same_state(a: TrainStep, b: TrainStep, rtol: float, atol: float) -> None:
    """Online and target parameters, BN statistics, banks, queues and centres agree."""
    for (key, x), y in zip(a.method.state_dict().items(), b.method.state_dict().values()):
        torch.testing.assert_close(y.float(), x.float(), rtol=rtol, atol=atol, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("name", METHODS)
def test_compiled_step_of_each_method_is_the_eager_step(fresh_dynamo, name):
    """``train.step_mode=compile`` traces every method's forward + loss as one graph (``fullgraph``:
    the EMA, bank and queue bookkeeping has no graph break) and trains as eager does: three steps give
    the same losses and the same online, target, bank and queue state (AOTAutograd backend on the CPU)."""
    eager, compiled = _family_steps(name, ("eager", "compile"), torch.device("cpu"),
                                    backend="aot_eager", fullgraph=True)
    losses = _run_alike([eager, compiled], 3, torch.device("cpu"))
    assert compiled.mode == "compile"
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    _assert_same_state(eager, compiled, rtol=1e-4, atol=1e-4)
    assert losses[0][0] != losses[0][2]  # the steps trained


@pytest.mark.gpu
@pytest.mark.parametrize("name", METHODS)
def test_graph_step_of_each_method_is_the_eager_step(fresh_dynamo, exact_cuda, name):
    """``train.step_mode=graph`` on CUDA: the captured step (EMA update, bank/queue writes and the
    momentum schedule replayed from device tensors) trains as eager does, one capture for every step.

    InstDisc's negatives and MoCo v2's shuffle are random draws; inductor lowers random ops to its
    own generator (other numbers than eager's for the same seed), so the equality test compiles with
    ``fallback_random``: the same ATen random ops, captured with the generator's graph-safe offsets."""
    import torch._inductor.config as inductor_config

    cuda = torch.device("cuda")
    with inductor_config.patch(fallback_random=True):
        eager, graph = _family_steps(name, ("eager", "graph"), cuda)
        losses = _run_alike([eager, graph], 8, cuda)
    assert graph.mode == "graph", graph.stats.fallback_reason
    assert graph.stats.captures == 1 and graph.stats.uncaptured_steps == 0
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-3, atol=1e-4)
    _assert_same_state(eager, graph, rtol=1e-3, atol=1e-3)
