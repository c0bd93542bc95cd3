"""Weighted k-nearest-neighbour evaluation of frozen trunk features."""
from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from tqdm import tqdm

from pipelines.badsamples import BadSamples
from pipelines.folder import ImageFolderIndex, scan_image_folder
from swav_fast.errors import DataError

log = logging.getLogger("swav_fast")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.228, 0.224, 0.225)


def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                num_classes: int, k: int = 20, temperature: float = 0.07,
                chunk: int = 1024) -> torch.Tensor:
    r"""Class predictions by similarity-weighted voting of the k nearest training samples.

    With L2-normalised features, each test sample x takes its k most cosine-similar training samples
    :math:`\mathcal{N}_k(x)` and predicts :math:`\arg\max_c \sum_{i \in \mathcal{N}_k(x)}
    \exp(\langle x, x_i \rangle / T)\,[y_i = c]` (Wu et al., 2018).
    """
    train_features = F.normalize(train_features.float(), dim=1)
    test_features = F.normalize(test_features.float(), dim=1)
    k = min(k, train_features.shape[0])
    preds = []
    for start in range(0, test_features.shape[0], chunk):
        sim = test_features[start:start + chunk] @ train_features.t()
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
        votes.scatter_add_(1, train_labels[top_idx], (top_sim / temperature).exp())
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


def eval_transform(image_size: int) -> transforms.Compose:
    """Resize the short side to ``size * 256/224``, centre crop ``size``, normalise."""
    return transforms.Compose([
        transforms.Resize(int(round(image_size * 256 / 224))),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def open_split(split: str | Path | ImageFolderIndex | Any) -> Any:
    """A random-access sample source (``read(i) -> (bytes, label)``, ``classes``, ``root``) for a split:
    an ImageFolder, or a folder that ``swav-fast prepare`` wrote (TFRecord, webdataset or beton).

    The readers are the loaders' own (:mod:`pipelines.formats`).
    """
    from pipelines.formats.folder import ImageFolderSource
    from pipelines.formats.sources import open_source

    if isinstance(split, ImageFolderIndex):
        return ImageFolderSource(split)
    if not isinstance(split, (str, Path)):
        return split  # already a source
    path = Path(split)
    fmt = _prepared_format(path)
    if fmt is not None:
        return open_source(path)
    return ImageFolderSource(scan_image_folder(path))


def _prepared_format(path: Path) -> str | None:
    """The format of a split written by ``swav-fast prepare``; None for anything else (an ImageFolder,
    which may hold a manifest.json of its own, e.g. a synthetic set's)."""
    import json

    from swav_fast.prepare import FORMATS, read_manifest

    try:
        with open(path / "manifest.json", encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, ValueError):
        return None
    if not (isinstance(m, dict) and m.get("format") in FORMATS and "shards" in m):
        return None
    return read_manifest(path)["format"]  # validated: a damaged manifest is an error, not a folder


class _EvalSource(Dataset):
    """Centre-cropped images of a sample source; unreadable samples give ``None`` (dropped and logged by
    the loaders' bad-sample policy, :class:`pipelines.badsamples.BadSamples` ``skip``)."""

    def __init__(self, source: Any, image_size: int):
        self.source = source
        self.transform = eval_transform(image_size)
        self.bad = BadSamples("skip")

    def __len__(self) -> int:
        return len(self.source)

    def _load(self, i: int) -> tuple[torch.Tensor, int]:
        data, label = self.source.read(i)
        with Image.open(io.BytesIO(data)) as img:
            return self.transform(img.convert("RGB")), label

    def __getitem__(self, i: int):
        return self.bad.resolve(i, len(self.source), self._load, self.source.name)[1]


def _collate(items):
    items = [it for it in items if it is not None]
    if not items:
        return None
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


def input_memory_format(module: nn.Module) -> torch.memory_format:
    """The layout to feed ``module``: channels-last when its first convolution weight is stored so
    (a trunk trained with ``train.channels_last``), else contiguous."""
    for p in module.parameters():
        if p.dim() == 4:
            cl = p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
            return torch.channels_last if cl else torch.contiguous_format
    return torch.contiguous_format


@torch.no_grad()
def extract_features(trunk: nn.Module, folder: str | Path | ImageFolderIndex | Any, image_size: int = 224,
                     batch_size: int = 128, device: str | torch.device = "cpu",
                     workers: int = 0, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised trunk features ``[N, D]`` and labels ``[N]`` of a split (eval mode).

    ``folder``: an ImageFolder or prepared split folder, an :class:`ImageFolderIndex`, or a source
    from :func:`open_split`; ``progress`` shows a bar named after the split.
    """
    source = open_split(folder)
    loader = DataLoader(_EvalSource(source, image_size), batch_size=batch_size, num_workers=workers,
                        collate_fn=_collate)
    was_training = trunk.training
    trunk.eval()
    feats, labels = [], []
    device = torch.device(device)
    bar = tqdm(loader, desc=f"features {Path(source.root).name}", unit="batch", disable=not progress,
               dynamic_ncols=True, leave=False)
    fmt = input_memory_format(trunk)
    for batch in bar:
        if batch is None:
            continue
        x, y = batch
        x = x.to(device, non_blocking=True).contiguous(memory_format=fmt)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            f = trunk(x)
        feats.append(F.normalize(f.float(), dim=1).cpu())
        labels.append(y)
    trunk.train(was_training)
    if not feats:
        raise DataError(f"no readable images in {source.root}")
    return torch.cat(feats), torch.cat(labels)


def split_dirs(data: str | Path, what: str = "kNN") -> tuple[Path, Path]:
    """``DATA/train`` and ``DATA/val`` (both must exist: ImageFolders or prepared splits); ``what``
    names the evaluation in errors."""
    data = Path(data)
    train, val = data / "train", data / "val"
    if not data.exists():
        raise DataError(f"{what} data folder {data} does not exist")
    if not (train.is_dir() and val.is_dir()):
        raise DataError(f"{what} data folder {data} must contain train/ and val/ "
                        "(ImageFolders or splits written by swav-fast prepare)")
    return train, val


@dataclass
class KNNResult:
    top1: float  # percent
    k: int
    temperature: float
    num_train: int
    num_val: int
    num_classes: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def knn_eval(trunk: nn.Module, data: str | Path, image_size: int = 224, k: int = 20,
             temperature: float = 0.07, batch_size: int = 128, device: str | torch.device = "cpu",
             workers: int = 0, progress: bool = False) -> KNNResult:
    """kNN top-1 (%) of ``trunk``: the bank is ``data/train``, queries are ``data/val``."""
    train, val = open_splits(data)
    ftr, ytr = extract_features(trunk, train, image_size, batch_size, device, workers, progress)
    fva, yva = extract_features(trunk, val, image_size, batch_size, device, workers, progress)
    pred = knn_predict(ftr, ytr, fva, len(train.classes), k, temperature)
    top1 = 100.0 * (pred == yva).float().mean().item()
    return KNNResult(top1, k, temperature, len(ytr), len(yva), len(train.classes))


def open_splits(data: str | Path, what: str = "kNN") -> tuple[Any, Any]:
    """Sources of ``DATA/train`` and ``DATA/val`` (see :func:`open_split`); their classes must agree."""
    train_dir, val_dir = split_dirs(data, what)
    train, val = open_split(train_dir), open_split(val_dir)
    if list(train.classes) != list(val.classes):
        raise DataError(f"{train_dir} and {val_dir} have different classes "
                        f"({len(train.classes)} and {len(val.classes)}, or another order)")
    return train, val


def knn_due(epochs_done: int, every: int) -> bool:
    """Whether the periodic kNN runs after ``epochs_done`` completed epochs (``every`` 0 = never)."""
    return every > 0 and epochs_done > 0 and epochs_done % every == 0


def periodic_knn(trunk: nn.Module, data: str | Path, cfg_eval, device: str | torch.device = "cpu",
                 workers: int = 0) -> dict:
    """kNN top-1 of the current trunk during training, as a flat dict ready for the run log.

    ``data`` holds ``train/`` (the bank) and ``val/`` (held-out queries); ``cfg_eval`` is the run's
    :class:`~swav_fast.config.EvalConfig` (``knn_k``, ``knn_temperature``, ``image_size``,
    ``batch_size``). The trunk's train/eval mode is restored afterwards, its weights are untouched.
    Returns ``{"top1", "k", "temperature", "num_train", "num_val", "num_classes", "seconds"}``.

    Wiring (``Trainer.fit``, rank 0, right after an epoch completes and ``self.pos.epoch`` is
    incremented)::

        every = self.cfg.eval.knn_every_epochs
        if self.knn_data is not None and knn_due(self.pos.epoch, every):
            out = periodic_knn(self.model.trunk, self.knn_data, self.cfg.eval, self.device)
            self.runlog.write("knn", step=self.pos.step, epoch=self.pos.epoch, periodic=True, **out)

    ``RunLog`` then also writes the TensorBoard scalar ``knn/top1``; ``swav-fast report`` plots
    ``top1`` of periodic records (and ``trained_top1`` of the end-of-training record) against steps.
    """
    t0 = time.perf_counter()
    result = knn_eval(trunk, data, image_size=cfg_eval.image_size, k=cfg_eval.knn_k,
                      temperature=cfg_eval.knn_temperature, batch_size=cfg_eval.batch_size, device=device,
                      workers=workers)
    return {**result.as_dict(), "seconds": round(time.perf_counter() - t0, 3)}
