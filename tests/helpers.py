"""Shared test helpers: tiny configs and image folders."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from swav_fast.config import load_config


def write_image_folder(root: Path, classes: int = 3, per_class: int = 8, size=(48, 40), seed: int = 0) -> Path:
    """A tiny ImageFolder of random-gradient JPEGs."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            y, x = np.mgrid[0:size[1], 0:size[0]]
            base = rng.uniform(0, 255, 3)
            img = (base + 60 * np.sin(x[..., None] / (3 + c) + rng.uniform(0, 6, 3)) +
                   rng.normal(0, 10, (size[1], size[0], 3)))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f"img_{i}.jpg", quality=90)
    return root


def tiny_config(data: Path, out: Path, *overrides: str):
    """A model and crops small enough for a CPU step in well under a second."""
    return load_config(None, [
        f"data.path={data}", f"train.output_dir={out}", "model.arch=resnet18", "model.hidden_dim=32",
        "model.feat_dim=16", "model.num_prototypes=20", "data.crops.num_crops=[2, 2]",
        "data.crops.size_crops=[32, 16]", "data.workers=0", "optim.batch_size=8", "optim.epochs=2",
        "optim.warmup_epochs=0.5", "optim.base_lr=0.5", "optim.final_lr=0.005", "optim.start_warmup=0.1",
        "methods.swav.freeze_prototypes_niters=2", "train.progress=false", "eval.at_end=false",
        "train.log_every=1", "train.seed=0", *overrides])
