"""Owning the CUDA-graph capture (:func:`swav_fast.step.capture_graph`): a capture that fails leaves the
process healthy. The cleanup logic runs on CPU against a fake graph and fake CUDA calls that keep the
allocator's bookkeeping as the real caching allocator does (a pool's use count, the pools being
recorded to, the current stream, the generator's capture flag); the GPU test fails a real capture, then
captures again in the same process and compares with eager."""
from __future__ import annotations

import contextlib

import pytest
import torch

from swav_fast.step import capture_graph


class FakeCuda:
    """The CUDA side of a capture, with the invariants the real one enforces."""

    def __init__(self):
        self.stream = "default"
        self.capturing = False
        self.recording: set[int] = set()  # pools allocations are routed to
        self.use_count: dict[int, int] = {}
        self.rng_in_capture = False
        self.calls: list[str] = []
        self._next = 0

    # the CudaCaptureOps interface
    def synchronize(self):
        self.calls.append("synchronize")

    def empty_cache(self):
        assert not self.recording, "emptyCache during a capture (the allocator asserts)"
        self.calls.append("empty_cache")

    def new_pool(self):
        self._next += 1
        return self._next

    def new_stream(self):
        return "side"

    @contextlib.contextmanager
    def use_stream(self, stream):
        before, self.stream = self.stream, stream
        try:
            yield
        finally:
            self.stream = before

    def is_capturing(self):
        return self.capturing

    def end_pool(self, pool):
        if pool not in self.recording:
            return False
        self.recording.discard(pool)
        return True

    def release_pool(self, pool):
        self.use_count[pool] -= 1
        assert self.use_count[pool] >= 0, "pool released twice"
        self.calls.append(f"release {pool}")

    def reset_rng(self):
        self.rng_in_capture = False
        self.calls.append("reset_rng")


class FakeGraph:
    """``torch.cuda.CUDAGraph``'s C++ side: ``end_fails`` makes cudaStreamEndCapture fail (an invalidated
    capture: the pool is not ended, the graph never counts as captured); ``old_order`` ends the pool
    before cudaStreamEndCapture (older torch)."""

    def __init__(self, cuda: FakeCuda, end_fails: bool = False, old_order: bool = False):
        self.cuda, self.end_fails, self.old_order = cuda, end_fails, old_order
        self.capture_ended = False
        self.resets = 0

    def capture_begin(self, pool, capture_error_mode):
        assert self.cuda.stream == "side"
        self.pool_id = pool
        self.cuda.use_count[pool] = self.cuda.use_count.get(pool, 0) + 1
        self.cuda.recording.add(pool)
        self.cuda.capturing = self.cuda.rng_in_capture = True

    def capture_end(self):
        assert self.cuda.stream == "side", "capture must end on the stream it began on"
        if self.old_order:
            self.cuda.recording.discard(self.pool_id)
        self.cuda.capturing = False  # cudaStreamEndCapture terminates the capture, valid or not
        if self.end_fails:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
        self.cuda.recording.discard(self.pool_id)
        self.cuda.rng_in_capture = False  # the generator's capture epilogue
        self.capture_ended = True

    def reset(self):
        self.resets += 1
        if self.capture_ended:
            self.cuda.use_count[self.pool_id] -= 1
            assert self.cuda.use_count[self.pool_id] >= 0, "pool released twice"
            self.capture_ended = False


def healthy(cuda: FakeCuda) -> None:
    assert cuda.stream == "default" and not cuda.capturing and not cuda.recording
    assert all(n == 0 for n in cuda.use_count.values()), cuda.use_count
    assert not cuda.rng_in_capture


def test_a_capture_that_succeeds_returns_the_body_output_and_keeps_its_pool():
    cuda = FakeCuda()
    graph = FakeGraph(cuda)
    assert capture_graph(graph, lambda: "loss", cuda) == "loss"
    assert graph.capture_ended and graph.resets == 0 and cuda.use_count == {1: 1}
    assert cuda.stream == "default" and not cuda.recording
    assert cuda.calls[:2] == ["synchronize", "empty_cache"]


def test_body_error_in_an_invalidated_capture_ends_and_releases_the_pool():
    """A host read during capture invalidates it: ending fails, the pool was never ended."""
    cuda = FakeCuda()
    graph = FakeGraph(cuda, end_fails=True)

    def body():
        raise RuntimeError("operation not permitted when stream is capturing")

    with pytest.raises(RuntimeError, match="not permitted when stream is capturing"):
        capture_graph(graph, body, cuda)
    healthy(cuda)
    assert "release 1" in cuda.calls and "reset_rng" in cuda.calls
    cuda.empty_cache()  # would assert with a pool still being recorded to
    second = FakeGraph(cuda)  # a second capture in the same process works
    assert capture_graph(second, lambda: 1, cuda) == 1 and second.capture_ended


def test_body_error_in_a_valid_capture_ends_it_and_the_graph_releases_its_pool():
    cuda = FakeCuda()
    graph = FakeGraph(cuda)

    def body():
        raise ValueError("a Python error inside the captured step")

    with pytest.raises(ValueError, match="Python error"):
        capture_graph(graph, body, cuda)
    healthy(cuda)
    assert graph.resets == 1 and not any(c.startswith("release") for c in cuda.calls)  # no double release


def test_capture_end_failing_after_a_good_body_is_cleaned_up_too():
    cuda = FakeCuda()
    graph = FakeGraph(cuda, end_fails=True)
    with pytest.raises(RuntimeError, match="previous error during capture"):
        capture_graph(graph, lambda: "loss", cuda)
    healthy(cuda)


def test_older_torch_that_ends_the_pool_first_is_never_released_twice():
    cuda = FakeCuda()
    graph = FakeGraph(cuda, end_fails=True, old_order=True)
    with pytest.raises(RuntimeError):
        capture_graph(graph, lambda: 0, cuda)
    assert cuda.stream == "default" and not cuda.recording and not cuda.capturing
    assert cuda.use_count[1] >= 0 and not cuda.rng_in_capture  # a leak at worst, never a double free


def test_a_failing_capture_begin_closes_the_pool_it_opened():
    cuda = FakeCuda()
    graph = FakeGraph(cuda)
    real_begin = graph.capture_begin

    def begin(pool, capture_error_mode):
        real_begin(pool, capture_error_mode)
        cuda.capturing = False
        raise RuntimeError("cudaStreamBeginCapture failed")

    graph.capture_begin = begin
    with pytest.raises(RuntimeError, match="BeginCapture"):
        capture_graph(graph, lambda: 0, cuda)
    healthy(cuda)


# -- GPU ------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_failed_capture_then_a_capture_that_matches_eager(exact_cuda):
    """A real capture invalidated by a host read; then, in the same process, ``empty_cache`` works, random
    ops work outside capture, the failed pool's memory is back, and a second capture replays the eager
    result."""
    from swav_fast.step import CudaCaptureOps

    dev = torch.device("cuda")
    ops = CudaCaptureOps(dev)
    x = torch.randn(256, 256, device=dev)
    w = torch.randn(256, 256, device=dev)
    torch.cuda.synchronize()
    base = torch.cuda.memory_reserved()
    stream_before = torch.cuda.current_stream()

    def bad():
        y = torch.relu(x @ w)
        big = torch.empty(64 << 20, dtype=torch.uint8, device=dev)  # 64 MiB in the graph's pool
        big.fill_(1)
        return y.sum().item() + int(big[0])  # a host read: illegal while capturing

    def attempt() -> str | None:  # the traceback (holding bad()'s tensors) is gone when this returns
        try:
            capture_graph(torch.cuda.CUDAGraph(), bad, ops, capture_error_mode="thread_local")
        except Exception as exc:  # noqa: BLE001 - any failure of the capture is the point here
            return f"{type(exc).__name__}: {exc}"
        return None

    assert attempt() is not None
    assert torch.cuda.current_stream() == stream_before
    assert not torch.cuda.is_current_stream_capturing()
    torch.cuda.empty_cache()  # asserts when a capture pool was left open
    torch.rand(8, device=dev)  # raises when the generator was left in capture mode
    assert torch.cuda.memory_reserved() <= base + (8 << 20)  # the 64 MiB are not held

    out = torch.empty(256, 256, device=dev)

    def good():
        out.copy_(torch.relu(x @ w) * 2.0)
        return out

    graph = torch.cuda.CUDAGraph()
    assert capture_graph(graph, good, ops, capture_error_mode="thread_local") is out
    x.copy_(torch.randn(256, 256, device=dev))
    graph.replay()
    torch.testing.assert_close(out, torch.relu(x @ w) * 2.0)
