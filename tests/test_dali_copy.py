"""DALI outputs into torch buffers: dense and non-contiguous TensorLists, the stream handle DALI gets
(a ``ctypes.c_void_p``, which DALI reads; a plain int would be read as stream 0), the uint8 HWC buffer
seen as channels-last NCHW. GPU tests skip where DALI is not installed and fail where it is broken."""
from __future__ import annotations

import ctypes
import importlib.util
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipelines import MultiCropSpec
from pipelines.dali_backend import DALILoader, copy_dali_output


def dali_missing() -> str | None:
    """Why DALI tests cannot run here (None: DALI is installed, so it must also work)."""
    try:
        found = importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:  # no nvidia namespace at all
        found = False
    return None if found else "NVIDIA DALI is not installed (pip install -e '.[dali]')"


needs_dali = pytest.mark.skipif(dali_missing() is not None, reason=str(dali_missing()))


def samples(b: int = 3, s: int = 4) -> np.ndarray:
    return np.arange(b * s * s * 3, dtype=np.uint8).reshape(b, s, s, 3) * 3


class Recorder:
    """A GPU-like DALI tensor: records what ``copy_to_external`` got."""

    def __init__(self, log: list, shape: tuple):
        self.log, self._shape = log, shape

    def copy_to_external(self, ptr, cuda_stream=None, non_blocking=False):
        self.log.append((ptr, cuda_stream, non_blocking))


class FakeList:
    """A TensorList whose samples are not contiguous (``is_dense_tensor`` False)."""

    def __init__(self, items: list, shape: tuple):
        self.items, self._shape = items, shape

    def is_dense_tensor(self) -> bool:
        return False

    def shape(self):
        return [self._shape] * len(self.items)

    def __getitem__(self, i):
        return self.items[i]


@needs_dali
def test_dense_and_non_contiguous_outputs_are_copied_exactly():
    from nvidia.dali import backend_impl

    a = samples()
    dense = backend_impl.TensorListCPU(a, "HWC")
    assert dense.is_dense_tensor()
    scattered = FakeList([backend_impl.TensorCPU(np.ascontiguousarray(x), "HWC") for x in a[::-1]], (4, 4, 3))
    for tl, ref in ((dense, a), (scattered, a[::-1])):
        dst = torch.zeros(3, 4, 4, 3, dtype=torch.uint8)
        copy_dali_output(tl, dst)
        assert torch.equal(dst, torch.from_numpy(np.ascontiguousarray(ref)))


@needs_dali
def test_wrong_shapes_and_destinations_are_refused():
    from nvidia.dali import backend_impl

    tl = backend_impl.TensorListCPU(samples(), "HWC")
    with pytest.raises(RuntimeError, match="expected 2 x"):
        copy_dali_output(tl, torch.zeros(2, 4, 4, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="contiguous"):
        copy_dali_output(tl, torch.zeros(3, 4, 3, 4, dtype=torch.uint8).transpose(2, 3))


def test_gpu_copies_get_the_stream_as_a_c_void_p_and_run_asynchronously():
    log: list = []
    tl = FakeList([Recorder(log, (4, 4, 3)) for _ in range(3)], (4, 4, 3))
    dst = torch.zeros(3, 4, 4, 3, dtype=torch.uint8)
    copy_dali_output(tl, dst, ctypes.c_void_p(0xBEEF))
    assert [p.value for p, _, _ in log] == [dst.data_ptr() + i * 48 for i in range(3)]
    assert all(isinstance(s, ctypes.c_void_p) and s.value == 0xBEEF and nb for _, s, nb in log)


def test_gather_passes_torch_s_current_stream_handle_and_keeps_hwc_memory():
    """The loader's gather: one buffer per crop size, each view's copy on the consumer stream's handle,
    returned as an NCHW view with channels-last strides (the HWC buffer itself)."""
    log: list = []
    spec = MultiCropSpec(num_crops=[2, 1], size_crops=[4, 2])
    fake = SimpleNamespace(spec=spec, device=torch.device("cpu"), _groups=[[0, 1], [2]])
    views = [FakeList([Recorder(log, (s, s, 3)) for _ in range(5)], (s, s, 3)) for s in spec.view_sizes]
    stream = SimpleNamespace(cuda_stream=12345)  # what torch.cuda.current_stream() gives
    out = DALILoader._gather(fake, views, 5, stream)
    assert [tuple(o.shape) for o in out] == [(10, 3, 4, 4), (5, 3, 2, 2)]
    assert all(o.is_contiguous(memory_format=torch.channels_last) for o in out)
    assert len(log) == 15 and all(isinstance(s, ctypes.c_void_p) and s.value == 12345 for _, s, _ in log)


# -- GPU ------------------------------------------------------------------------------------------
@pytest.mark.gpu
@needs_dali
def test_gpu_loader_on_a_side_stream_matches_the_cpu_path(tmp_path):
    """The consumer runs on a non-default stream: DALI's copies are ordered on it, so the batches equal
    the CPU path's (same draws) up to decoder rounding."""
    from tests.helpers import write_image_folder

    data = write_image_folder(tmp_path / "data", classes=2, per_class=6, size=(48, 40))
    spec = MultiCropSpec(num_crops=[2, 2], size_crops=[24, 12], dtype="bfloat16", channels_last=True)
    gpu = DALILoader(data, spec, batch_size=4, device="cuda", num_workers=2, seed=3)
    cpu = DALILoader(data, spec, batch_size=4, device="cpu", num_workers=2, seed=3)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(5_000_000)  # the consumer stream is busy: a copy on stream 0 would not wait
        got = [[v.float() for v in b.views] for b in gpu]
    torch.cuda.synchronize()
    for g, c in zip(got, list(cpu)):
        for u, w in zip(g, c.views):
            assert (u.cpu() - w.float()).abs().mean() < 0.1
