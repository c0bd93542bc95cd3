"""Regression tests of issue 17: hostile datasets, reproducible prepare, divergence, one-line errors."""
from __future__ import annotations

import math

import pytest

from swav_fast.data.synthetic import generate_synthetic
from swav_fast.train import train
from tests.helpers import tiny_config

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
                      "data.synthetic.val_images=8", "data.synthetic.classes=3", "data.synthetic.size=[48, 40]")
    cfg.data.path = None
    result = train(cfg)
    assert result.steps == 2 and math.isfinite(result.last_loss)
    assert (tmp_path / "cache").is_dir()
