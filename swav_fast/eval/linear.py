"""Linear probe: a linear classifier trained on frozen, pre-extracted trunk features.

Protocol (defaults follow the SwAV paper's linear evaluation): SGD with momentum 0.9, learning rate
0.3 for a batch of 256 (scaled linearly with the batch size), cosine decay to 0 over 100 epochs,
weight decay 1e-6; top-1 and top-5 accuracy on ``DATA/val``. Unlike the paper, which trains on
augmented crops through the frozen trunk, features are extracted *once* from centre crops (the kNN
transform) and the classifier trains on them, so 100 epochs take seconds to minutes instead of
hours; ``fast=True`` (``--fast``) trains for :data:`FAST_EPOCHS` epochs.

Features are the trunk's L2-normalised pooled features (:func:`swav_fast.eval.knn.extract_features`),
then standardised with the mean and standard deviation of the training features (a fixed,
affine-free batch norm, as in MAE's linear probe) so that the paper's learning rate suits any trunk
width. Extracted features can be cached in a ``.pt`` file keyed by the trunk's weights, the data
(files, sizes, modification times) and the image size: a second probe of the same checkpoint on
the same data loads them instead of running the trunk again.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from pipelines.folder import ImageFolderIndex
from swav_fast.errors import DataError
from swav_fast.eval.knn import extract_features, open_splits

log = logging.getLogger("swav_fast")

#: Epochs of ``--fast`` (the paper's protocol uses 100).
FAST_EPOCHS = 10
#: Bumped when the cached feature format or the extraction changes.
CACHE_VERSION = 1


@dataclass
class Features:
    """Train/val features ``[N, D]`` (float32, L2-normalised) and labels ``[N]`` of one dataset."""
    train_features: torch.Tensor
    train_labels: torch.Tensor
    val_features: torch.Tensor
    val_labels: torch.Tensor
    classes: list[str]
    cached: bool = False  # loaded from a cache file rather than extracted


@dataclass
class LinearResult:
    top1: float  # percent, on DATA/val
    top5: float  # percent (top-k with k = min(5, classes))
    train_top1: float  # percent, on the training features (with the final classifier)
    epochs: int
    lr: float  # the learning rate used (after batch-size scaling)
    batch_size: int
    weight_decay: float
    num_train: int
    num_val: int
    num_classes: int
    feature_dim: int
    features_cached: bool  # the features came from the cache
    extract_seconds: float
    train_seconds: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


# -- features ------------------------------------------------------------------------------------
def trunk_fingerprint(trunk: nn.Module) -> str:
    """SHA-256 of a module's state dict (names, shapes, dtypes and values)."""
    h = hashlib.sha256()
    for name, t in trunk.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        flat = t.detach().cpu().contiguous().reshape(-1)
        h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return h.hexdigest()


def folder_fingerprint(index: ImageFolderIndex) -> str:
    """SHA-256 of an ImageFolder's classes and files (relative path, label, size, mtime)."""
    h = hashlib.sha256(f"{index.root}\n{index.classes}\n".encode())
    for rel, label in index.samples:
        try:
            st = os.stat(os.path.join(index.root, rel))
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        h.update(f"{rel}\t{label}\t{stamp}\n".encode())
    return h.hexdigest()


def split_fingerprint(source) -> str:
    """Fingerprint of a split from :func:`~swav_fast.eval.knn.open_split`: an ImageFolder's files
    (:func:`folder_fingerprint`), or a prepared split's manifest (shard names, sizes, SHA-256) and the
    shard files' sizes and modification times."""
    index = getattr(source, "index", None)
    if isinstance(index, ImageFolderIndex):
        return folder_fingerprint(index)
    root = Path(source.root)
    split = root if (root / "manifest.json").is_file() else root.parent  # a beton source's root
    h = hashlib.sha256(f"{split}\n{source.classes}\n{len(source)}\n".encode())
    h.update((split / "manifest.json").read_bytes())
    for p in sorted(split.iterdir()):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.name}\t{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def feature_cache_key(trunk: nn.Module, train_index, val_index, image_size: int) -> str:
    """Key of the cached features: trunk weights + both splits' files + image size.

    ``train_index`` / ``val_index``: :class:`ImageFolderIndex` or sources from ``open_split``.
    """
    parts = [f"v{CACHE_VERSION}", trunk_fingerprint(trunk),
             *(folder_fingerprint(x) if isinstance(x, ImageFolderIndex) else split_fingerprint(x)
               for x in (train_index, val_index)), str(int(image_size))]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def _load_cache(path: Path, key: str) -> Features | None:
    if not path.is_file():
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(obj, dict) or obj.get("key") != key:
            log.warning("feature cache %s does not match this trunk/data; extracting again", path)
            return None
        return Features(obj["train_features"].float(), obj["train_labels"].long(),
                        obj["val_features"].float(), obj["val_labels"].long(), list(obj["classes"]),
                        cached=True)
    except Exception as exc:  # truncated / foreign file: ignore it and extract again
        log.warning("unusable feature cache %s (%s); extracting again", path, exc)
        return None


def load_features(trunk: nn.Module, data: str | Path, image_size: int = 224, batch_size: int = 128,
                  device: str | torch.device = "cpu", workers: int = 0,
                  cache_dir: str | Path | None = None, progress: bool = False) -> Features:
    """Features of ``data/train`` and ``data/val``, from ``cache_dir`` when already extracted.

    With ``cache_dir``, the features are stored (float16, written atomically) as
    ``cache_dir/features-<key>.pt`` where the key covers the trunk's weights, both splits' files and
    the image size; the file loads with ``torch.load(..., weights_only=True)``.  ``data/train`` and
    ``data/val`` are ImageFolders or splits written by ``swav-fast prepare``.
    """
    train_index, val_index = open_splits(data, "linear probe")
    path = key = None
    if cache_dir is not None:
        key = feature_cache_key(trunk, train_index, val_index, image_size)
        path = Path(cache_dir) / f"features-{key[:24]}.pt"
        found = _load_cache(path, key)
        if found is not None:
            log.info("loaded cached features from %s", path)
            return found
    ftr, ytr = extract_features(trunk, train_index, image_size, batch_size, device, workers, progress)
    fva, yva = extract_features(trunk, val_index, image_size, batch_size, device, workers, progress)
    feats = Features(ftr, ytr, fva, yva, list(train_index.classes))
    if path is not None:
        from swav_fast.checkpoint import atomic_save

        atomic_save({"key": key, "image_size": int(image_size), "classes": feats.classes,
                     "train_features": ftr.half(), "train_labels": ytr,
                     "val_features": fva.half(), "val_labels": yva}, path)
        log.info("cached features in %s", path)
    return feats


# -- classifier ----------------------------------------------------------------------------------
def standardize(train: torch.Tensor, *others: torch.Tensor, eps: float = 1e-6) -> list[torch.Tensor]:
    """Subtract the training mean and divide by the training std (per dimension) in all inputs."""
    mean = train.mean(dim=0, keepdim=True)
    std = train.std(dim=0, unbiased=False, keepdim=True) + eps
    return [(x - mean) / std for x in (train, *others)]


def train_linear(features: torch.Tensor, labels: torch.Tensor, num_classes: int, epochs: int = 100,
                 lr: float = 0.3, batch_size: int = 256, weight_decay: float = 1e-6,
                 momentum: float = 0.9, seed: int = 0,
                 device: str | torch.device = "cpu", progress: bool = False) -> nn.Linear:
    """An ``nn.Linear`` trained with cross-entropy, SGD (momentum) and per-iteration cosine decay.

    ``lr`` is the learning rate actually used (no scaling here); the classifier starts at zero.
    """
    if epochs < 1:
        raise DataError(f"linear probe needs at least one epoch, got {epochs}")
    device = torch.device(device)
    x, y = features.to(device).float(), labels.to(device).long()
    n = x.shape[0]
    clf = nn.Linear(x.shape[1], num_classes).to(device)
    nn.init.zeros_(clf.weight)
    nn.init.zeros_(clf.bias)
    opt = torch.optim.SGD(clf.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    total = epochs * steps_per_epoch
    step = 0
    for _ in tqdm(range(epochs), desc="linear probe", unit="epoch", disable=not progress, dynamic_ncols=True,
                  leave=False):
        perm = torch.randperm(n, generator=gen).to(device)
        for start in range(0, n, batch_size):
            idx = perm[start:start + batch_size]
            for g in opt.param_groups:
                g["lr"] = 0.5 * lr * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(clf(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return clf


@torch.no_grad()
def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[float]:
    """Top-k accuracies in percent; ``k`` is capped at the number of classes."""
    maxk = min(max(ks), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    hit = pred == labels.view(-1, 1)
    return [100.0 * hit[:, :min(k, maxk)].any(dim=1).float().mean().item() for k in ks]


def linear_probe_features(feats: Features, epochs: int = 100, lr: float = 0.3, batch_size: int = 256,
                          weight_decay: float = 1e-6, momentum: float = 0.9, scale_lr: bool = True,
                          standardize_features: bool = True, seed: int = 0,
                          device: str | torch.device = "cpu", progress: bool = False) -> LinearResult:
    """Train and evaluate the linear classifier on already extracted features.

    With ``scale_lr``, ``lr`` is the rate for a batch of 256 and the rate used is
    ``lr * batch_size / 256`` (the linear scaling rule).
    """
    num_classes = len(feats.classes)
    ftr, fva = feats.train_features.float(), feats.val_features.float()
    if standardize_features:
        ftr, fva = standardize(ftr, fva)
    used_lr = lr * batch_size / 256 if scale_lr else lr
    t0 = time.perf_counter()
    clf = train_linear(ftr, feats.train_labels, num_classes, epochs, used_lr, batch_size, weight_decay,
                       momentum, seed, device, progress)
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        dev = clf.weight.device
        top1, top5 = topk_accuracy(clf(fva.to(dev)), feats.val_labels.to(dev))
        (train_top1,) = topk_accuracy(clf(ftr.to(dev)), feats.train_labels.to(dev), ks=(1,))
    return LinearResult(top1, top5, train_top1, epochs, used_lr, batch_size, weight_decay,
                        len(feats.train_labels), len(feats.val_labels), num_classes, ftr.shape[1],
                        feats.cached, 0.0, seconds)


def linear_probe(trunk: nn.Module, data: str | Path, *, image_size: int = 224, epochs: int = 100,
                 fast: bool = False, lr: float = 0.3, batch_size: int = 256, weight_decay: float = 1e-6,
                 momentum: float = 0.9, scale_lr: bool = True, standardize_features: bool = True,
                 seed: int = 0, feature_batch_size: int = 128, device: str | torch.device = "cpu",
                 workers: int = 0, cache_dir: str | Path | None = None,
                 progress: bool = False) -> LinearResult:
    """Linear-probe top-1/top-5 (%) of a frozen ``trunk``: trained on ``data/train``, tested on ``data/val``.

    ``fast=True`` trains for :data:`FAST_EPOCHS` epochs instead of ``epochs``. ``cache_dir`` caches
    the extracted features (see :func:`load_features`). The trunk is not modified.
    """
    t0 = time.perf_counter()
    feats = load_features(trunk, data, image_size, feature_batch_size, device, workers, cache_dir, progress)
    extract_seconds = time.perf_counter() - t0
    result = linear_probe_features(feats, FAST_EPOCHS if fast else epochs, lr, batch_size, weight_decay,
                                   momentum, scale_lr, standardize_features, seed, device, progress)
    result.extract_seconds = extract_seconds
    return result
