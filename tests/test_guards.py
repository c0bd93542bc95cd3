"""The non-finite guard's multi-tensor snapshot and restore against the per-tensor rule
``t <- where(finite, t, snapshot)``: mixed dtypes and devices' groups, channels-last and non-dense
tensors, NaN values, tensors created during the step, buffers reused between steps."""
from __future__ import annotations

import pytest
import torch

from swav_fast.guards import NonFiniteGuard


def state(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(6, 8, generator=g)
    return [
        torch.randn(4, 3, 5, 5, generator=g).contiguous(memory_format=torch.channels_last),
        torch.randn(7, generator=g),
        torch.randn(3, 4, generator=g).to(torch.bfloat16),
        torch.tensor([5, 7], dtype=torch.long),  # a counter (the queue's)
        base[:, ::2],  # not dense: its own snapshot
        torch.randn(2, 3, generator=g).double(),
        torch.zeros(0),
    ]


def scribble(tensors: list[torch.Tensor], with_nan: bool) -> None:
    """What a step does: change every tensor in place (NaN in a blown-up step)."""
    for t in tensors:
        if t.numel() == 0:
            continue
        if t.dtype.is_floating_point:
            t.mul_(-3.0).add_(1.0)
            if with_nan:
                t[(0,) * t.dim()] = float("nan")
        else:
            t.add_(16)


@pytest.mark.parametrize("finite", [True, False])
def test_restore_equals_the_per_tensor_rule(finite):
    tensors = state()
    before = [t.clone() for t in tensors]
    strides = [t.stride() for t in tensors]
    guard = NonFiniteGuard(torch.device("cpu"))
    for step in range(2):  # the second step reuses the buffers
        guard.begin(tensors)
        snapshot = [t.clone() for t in tensors]
        scribble(tensors, with_nan=not finite)
        after = [t.clone() for t in tensors]
        guard.end(torch.tensor(finite), tensors)
        for i, (t, old, new) in enumerate(zip(tensors, snapshot, after)):
            expected = torch.where(torch.tensor(finite), new, old)
            assert torch.equal(t, expected), i
            assert t.stride() == strides[i] and t.dtype == new.dtype
    if not finite:
        for t, b in zip(tensors, before):
            assert torch.equal(t, b)
    skipped = 0 if finite else 2
    assert guard.counts().total == skipped and guard.counts().worst_streak == skipped


def test_tensors_created_during_the_step_are_zeroed_when_it_is_skipped():
    tensors = state()
    guard = NonFiniteGuard(torch.device("cpu"))
    guard.begin(tensors)
    scribble(tensors, with_nan=True)
    momentum = torch.full((3,), 2.0)  # the optimiser's first momentum buffer
    guard.end(torch.tensor(False), tensors + [momentum])
    assert torch.equal(momentum, torch.zeros(3))
    assert torch.equal(tensors[1], state()[1])


def test_snapshot_is_multi_tensor_few_kernels(monkeypatch):
    """Per dense (device, dtype) group one flat buffer; the restore calls where once per group, not per
    tensor (the non-dense tensor and the empty one go the per-tensor way)."""
    tensors = state()
    guard = NonFiniteGuard(torch.device("cpu"))
    guard.begin(tensors)
    calls = []
    real_where = torch.where

    def counting(*args, **kwargs):
        calls.append(args[1].shape)
        return real_where(*args, **kwargs)

    monkeypatch.setattr(torch, "where", counting)
    guard.end(torch.tensor(False), tensors)
    dense_kinds = {(torch.float32,), (torch.bfloat16,), (torch.long,), (torch.float64,)}
    assert len(calls) == len(dense_kinds) + 2  # one per dense dtype + the non-dense + the empty tensor
