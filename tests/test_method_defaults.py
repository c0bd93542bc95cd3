"""Paper-faithful defaults that each method declares: LARS convention, projector sizes, the warm-up's
first learning rate, InstDisc's NCE epsilon and memory-bank start (each against the official code)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from swav_fast.config import load_config
from swav_fast.errors import ConfigError
from swav_fast.losses.contrastive import NCE_EPS
from swav_fast.memory import MemoryBank
from swav_fast.methods import available_methods, build_method, exclude_bias_and_norm, head_sizes, method_info
from swav_fast.optim import LARS, lars_param_groups, warmup_cosine_lr
from swav_fast.run import build_optimizer

#: the official code's convention: LARC / weight decay over all parameters, or biases and norms excluded
OFFICIAL_LARS = {"swav": "all", "instdisc": "all", "moco_v2": "all", "simsiam": "all",
                 "simclr": "exclude_bias_and_norm", "byol": "exclude_bias_and_norm",
                 "barlow_twins": "exclude_bias_and_norm", "moco_v3": "exclude_bias_and_norm",
                 "dino": "exclude_bias_and_norm"}
#: (model.hidden_dim, model.feat_dim) of each paper's ResNet-50 head
PAPER_HEADS = {"swav": (2048, 128), "instdisc": (2048, 128), "moco_v2": (2048, 128), "simclr": (2048, 128),
               "byol": (4096, 256), "barlow_twins": (8192, 8192), "simsiam": (2048, 2048),
               "moco_v3": (4096, 256), "dino": (2048, 256)}


def test_every_method_declares_its_conventions():
    assert set(OFFICIAL_LARS) == set(available_methods()) == set(PAPER_HEADS)
    for name in available_methods():
        info = method_info(name)
        assert info.optim == OFFICIAL_LARS[name] and info.heads == PAPER_HEADS[name], name
        assert info.config is not None and info.paper and info.state and info.ddp, name


# -- LARS convention -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(OFFICIAL_LARS))
def test_auto_lars_exclusion_is_the_methods_own(name):
    cfg = load_config(None, [f"train.method={name}"])
    assert cfg.optim.exclude_bias_and_norm == "auto"
    assert exclude_bias_and_norm(cfg) == (OFFICIAL_LARS[name] == "exclude_bias_and_norm")
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    groups = build_optimizer(cfg, model).param_groups
    if OFFICIAL_LARS[name] == "all":  # one adapted group with weight decay, the biases and BN included
        assert len(groups) == 1 and len(groups[0]["params"]) == 4 and groups[0]["weight_decay"] > 0
    else:
        assert [len(g["params"]) for g in groups] == [1, 3] and groups[1]["lars_exclude"]
        assert groups[1]["weight_decay"] == 0.0


def test_explicit_lars_exclusion_is_honoured():
    for value, want in (("true", True), ("false", False)):
        for name in ("swav", "byol"):
            assert exclude_bias_and_norm(load_config(None, [f"train.method={name}",
                                                            f"optim.exclude_bias_and_norm={value}"])) is want
    with pytest.raises(ConfigError, match="exclude_bias_and_norm='sometimes' must be true, false or auto"):
        load_config(None, ["optim.exclude_bias_and_norm=sometimes"])


def test_recipes_take_the_official_convention_or_keep_the_tuned_one():
    for recipe in ("swav_800ep_bs4096", "swav_400ep_bs256", "swav_200ep_bs256", "quick"):
        assert not exclude_bias_and_norm(load_config(recipe)), recipe  # SwAV: LARC over all parameters
    for recipe in ("quick_instdisc", "quick_moco_v2", "quick_simsiam"):  # tuned with the exclusion
        assert load_config(recipe).optim.exclude_bias_and_norm is True, recipe
    for recipe in ("quick_simclr", "quick_byol", "quick_barlow_twins", "quick_moco_v3", "quick_dino"):
        assert exclude_bias_and_norm(load_config(recipe)), recipe


def test_lars_over_all_parameters_matches_apex_larc():
    """One step on a bias and a BN weight with the ``all`` convention: apex LARC (clip=False) scales
    ``g + wd w`` by ``trust ||w|| / (||g|| + wd ||w|| + eps)`` for every parameter, then SGD momentum."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).double()
    for p in model.parameters():
        p.data.normal_()
        p.grad = torch.randn_like(p)
    before = {n: (p.detach().clone(), p.grad.clone()) for n, p in model.named_parameters()}
    lr, wd, trust, eps = 0.5, 1e-4, 1e-3, 1e-8
    LARS(lars_param_groups(model, exclude_bias_and_norm=False), lr=lr, momentum=0.9, weight_decay=wd,
         trust_coefficient=trust, eps=eps).step()
    for name, p in model.named_parameters():
        w, g = (t.numpy() for t in before[name])
        ratio = trust * np.linalg.norm(w) / (np.linalg.norm(g) + wd * np.linalg.norm(w) + eps)
        np.testing.assert_allclose(p.detach().numpy(), w - lr * ratio * (g + wd * w), rtol=1e-12, atol=1e-15)


# -- heads ------------------------------------------------------------------------------------------------
def _linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("name", sorted(PAPER_HEADS))
def test_default_heads_are_the_papers(name):
    cfg = load_config(None, [f"train.method={name}", "model.arch=resnet18", "methods.instdisc.memory_size=8",
                             "methods.moco_v2.queue_length=1024"])
    assert (cfg.model.hidden_dim, cfg.model.feat_dim) == (None, None)
    hidden, feat = head_sizes(cfg)
    assert (hidden, feat) == PAPER_HEADS[name]
    with torch.device("meta"):  # shapes only: Barlow Twins' 8192 x 8192 layers need no memory here
        model = build_method(name, cfg).model
    head = _linears(model.head)
    if name == "instdisc":  # the paper's linear projection to 128
        assert [(m.in_features, m.out_features) for m in head] == [(512, 128)]
    elif name == "dino":  # 2048 hidden, 256 bottleneck, weight-normalised layer to 65536
        assert [m.out_features for m in head] == [2048, 2048, 256]
        assert model.head.last_layer.weight.shape[0] == 65536
    else:
        assert (head[0].out_features, head[-1].out_features) == (hidden, feat), [m.out_features for m in head]
    if name == "barlow_twins":
        assert [m.out_features for m in head] == [8192, 8192, 8192]
    predictor = getattr(model, "predictor", None)
    if name in ("byol", "moco_v3"):
        assert [(m.in_features, m.out_features) for m in _linears(predictor)] == [(256, 4096), (4096, 256)]
    if name == "simsiam":  # the 512 bottleneck
        assert [(m.in_features, m.out_features) for m in _linears(predictor)] == [(2048, 512), (512, 2048)]


def test_explicit_heads_are_honoured():
    cfg = load_config(None, ["train.method=byol", "model.hidden_dim=64", "model.feat_dim=32"])
    assert head_sizes(cfg) == (64, 32)
    cfg = load_config(None, ["model.hidden_dim=0"])  # SwAV's linear head (hidden_mlp=0) stays expressible
    assert head_sizes(cfg) == (0, 128)


def test_benchmark_paper_heads_are_the_declarations():
    from benchmarks import bench_methods

    assert bench_methods.PAPER_HEADS == PAPER_HEADS


# -- schedule ---------------------------------------------------------------------------------------------
def official_swav_schedule(base, final, start, warmup_iters, total_iters):
    """main_swav.py: ``np.linspace(start_warmup, base_lr, warmup)`` then the cosine over the rest."""
    warmup = np.linspace(start, base, warmup_iters)
    iters = np.arange(total_iters - warmup_iters)
    cosine = np.array([final + 0.5 * (base - final) * (1 + math.cos(math.pi * t / len(iters)))
                       for t in iters])
    return np.concatenate((warmup, cosine))


@pytest.mark.parametrize("warmup", [0, 1, 2, 7])
def test_schedule_is_the_official_one(warmup):
    total = 20
    want = official_swav_schedule(4.8, 0.0048, 0.3, warmup, total)
    got = [warmup_cosine_lr(t, total, warmup, 4.8, 0.0048, 0.3) for t in range(total)]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    if warmup:
        assert got[0] == 0.3  # a one-iteration warm-up starts (and ends) at start_warmup too


# -- InstDisc -----------------------------------------------------------------------------------------------
def test_memory_bank_starts_as_lemniscate():
    """lemniscate.pytorch NCEAverage: ``stdv = 1 / sqrt(dim / 3)``, ``rand(n, dim) * 2 stdv - stdv``."""
    torch.manual_seed(0)
    dim = 128
    bank = MemoryBank(2000, dim).bank
    stdv = 1.0 / math.sqrt(dim / 3)
    assert bank.min() >= -stdv and bank.max() <= stdv
    assert bank.min() < -0.99 * stdv and bank.max() > 0.99 * stdv  # uniform over the whole range
    assert abs(float(bank.mean())) < 0.01 and abs(float(bank.pow(2).sum(1).mean()) - 1.0) < 0.02
    assert float(bank.norm(dim=1).std()) > 0.01  # not normalised: rows of unit norm only on average


def test_nce_epsilon_is_lemniscates():
    assert NCE_EPS == 1e-7


# -- adding a method -------------------------------------------------------------------------------------
def test_a_method_is_one_file(tmp_path):
    """The worked example of docs/methods.md, as written there: one file registers a method that the
    trainer, the registry and the benchmark's paper heads then know, and it trains."""
    import importlib.util
    import re
    from pathlib import Path

    from swav_fast.methods import METHODS
    from swav_fast.train import Trainer
    from tests.helpers import tiny_config, write_image_folder

    doc = (Path(__file__).parents[1] / "docs" / "methods.md").read_text()
    code = re.search(r"<!-- example-method -->\n```python\n(.*?)```\n<!-- end-example-method -->", doc, re.S)
    assert code is not None, "docs/methods.md lost its example method"
    path = tmp_path / "align_uniform.py"
    path.write_text(code.group(1))
    spec = importlib.util.spec_from_file_location("align_uniform_example", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)  # registering is importing
        assert "align_uniform" in available_methods() and method_info("align_uniform").heads == (2048, 128)
        data = write_image_folder(tmp_path / "data")
        trainer = Trainer(tiny_config(data, tmp_path / "run", "train.method=align_uniform", "optim.epochs=1",
                                      "train.max_steps=2", "model.arch=resnet10_half"))
        assert isinstance(trainer.method, module.AlignUniform)
        before = trainer.model.trunk.conv1.weight.detach().clone()
        result = trainer.fit()
        assert result.steps == 2 and math.isfinite(result.last_loss)
        assert not torch.equal(before, trainer.model.trunk.conv1.weight)
    finally:
        METHODS._entries.pop("align_uniform", None)
        METHODS._meta.pop("align_uniform", None)


def test_method_modules_and_sections_are_discovered():
    """No hand-kept lists: every module of swav_fast/methods/ (bar the framework) is a method module
    that registers at least one method, and MethodsConfig's fields are the @method_section dataclasses,
    each the config a registered method declares."""
    import importlib
    import pkgutil
    from dataclasses import fields

    import swav_fast.methods as package
    from swav_fast.methods import METHODS, method_modules
    from swav_fast.methods.configs import _SECTIONS, METHOD_SECTIONS, MethodsConfig, method_section

    on_disk = {m.name for m in pkgutil.iter_modules(package.__path__)}
    assert set(method_modules()) == on_disk - {"base", "configs", "momentum"}
    available_methods()  # loads them all
    for name in method_modules():
        module = importlib.import_module(f"swav_fast.methods.{name}")
        registered = [n for n in METHODS.names() if METHODS.get(n).factory.__module__ == module.__name__]
        assert registered, f"swav_fast/methods/{name}.py registers no method"
    assert METHOD_SECTIONS == tuple(_SECTIONS) == tuple(f.name for f in fields(MethodsConfig))
    assert {n: type(getattr(MethodsConfig(), n)) for n in METHOD_SECTIONS} == _SECTIONS
    for n in available_methods():
        if method_info(n).config is not None:
            assert _SECTIONS[n] is method_info(n).config
    with pytest.raises(ValueError, match="declared twice"):
        method_section("byol")(type("Again", (), {}))
