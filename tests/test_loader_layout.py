"""The loader writes what the step reads: on CUDA a bf16 channels-last step gets bf16 channels-last views
from the loader (the spec follows the step unless set), so the step converts nothing."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from pipelines import MultiCropSpec, scan_image_folder
from pipelines.spec import spec_for_step
from pipelines.torch_backend import TorchLoader
from swav_fast.errors import ConfigError
from swav_fast.step import TrainStep
from tests.helpers import tiny_config, write_image_folder

pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities:DeprecationWarning")
SPEC = MultiCropSpec(num_crops=[2, 2], size_crops=[32, 16])


@pytest.mark.parametrize("precision,dtype", [("bf16", "bfloat16"), ("auto", "bfloat16"), ("fp16", "float16"),
                                             ("fp32", "float32")])
def test_on_cuda_the_spec_follows_the_step(precision, dtype):
    out = spec_for_step(SPEC, "cuda", precision, channels_last=True)
    assert out.dtype == dtype and out.channels_last is True
    assert out.size_crops == SPEC.size_crops and out.blur_p == SPEC.blur_p  # nothing else changes
    assert spec_for_step(SPEC, torch.device("cuda", 0), precision, False).channels_last is False


def test_an_explicit_dtype_or_layout_is_kept_and_cpu_steps_change_nothing():
    half = SPEC.replace(dtype="float16", channels_last=True)
    assert spec_for_step(half, "cuda", "bf16", channels_last=False) is half
    assert spec_for_step(SPEC, "cpu", "bf16", channels_last=True) is SPEC
    with pytest.raises(ConfigError, match="precision"):
        spec_for_step(SPEC, "cuda", "int8", True)


def test_torch_backend_views_need_no_conversion_by_the_step(tmp_path: Path):
    """With the spec a bf16 channels-last CUDA step asks for, the torch backend's CPU path already emits
    bf16 channels-last views; the step's input preparation then returns the very same tensors."""
    root = tmp_path / "data"
    for c in range(2):
        for k in range(4):
            (root / f"c{c}").mkdir(parents=True, exist_ok=True)
            img = Image.new("RGB", (40 + 4 * k, 36), (40 * k, 200 - 30 * c, 90))
            img.save(root / f"c{c}" / f"{k}.jpg", quality=90)
    spec = spec_for_step(SPEC, "cuda", "bf16", channels_last=True)
    ld = TorchLoader(scan_image_folder(root), spec, 4)
    try:
        batch = next(iter(ld))
    finally:
        ld.close()
    for v in batch.views:
        assert v.dtype == torch.bfloat16 and v.is_contiguous(memory_format=torch.channels_last)
        assert v.dim() == 4 and v.shape[1] == 3
    step = TrainStep.__new__(TrainStep)  # only the input preparation: no model needed
    step.device, step.channels_last = torch.device("cpu"), True
    prepared = step._prepare(batch.views)
    assert all(p is v for p, v in zip(prepared, batch.views))  # no per-step conversion copy


@pytest.mark.gpu
def test_trainer_builds_its_loader_for_the_step(tmp_path: Path):
    from swav_fast.train import Trainer

    data = write_image_folder(tmp_path / "data")
    cfg = tiny_config(data, tmp_path / "run", "train.device=cuda", "train.precision=bf16",
                      "train.channels_last=true", "data.loader=torch")
    trainer = Trainer(cfg)
    assert trainer.loader.spec.dtype == "bfloat16" and trainer.loader.spec.channels_last
    batch = next(iter(trainer.loader))
    assert all(v.dtype == torch.bfloat16 and v.is_contiguous(memory_format=torch.channels_last)
               for v in batch.views)
    prepared = trainer.step_fn._prepare(batch.views)
    assert all(p is v for p, v in zip(prepared, batch.views))
