"""Feature queue: FIFO order, used only once full, carried by state_dict."""
import torch

from swav_fast.losses import sinkhorn_knopp, swapped_prediction_loss
from swav_fast.methods.swav import SwAVObjective
from swav_fast.methods.swav import FeatureQueue


def test_fifo_and_full():
    q = FeatureQueue(slots=2, length=6, dim=3)
    batches = [torch.full((2, 2, 3), float(i)) for i in range(1, 5)]
    for i, b in enumerate(batches[:3]):
        assert not q.is_full()
        q.push(b)
    assert q.is_full()
    assert q.items[0, :, 0].tolist() == [3, 3, 2, 2, 1, 1]  # newest first
    q.push(batches[3])
    assert q.items[1, :, 0].tolist() == [4, 4, 3, 3, 2, 2]  # oldest dropped


def test_state_dict_round_trip():
    q = FeatureQueue(2, 4, 3)
    q.push(torch.randn(2, 2, 3))
    q2 = FeatureQueue(2, 4, 3)
    q2.load_state_dict(q.state_dict())
    assert torch.equal(q2.items, q.items) and int(q2.count) == 2 and not q2.is_full()


def _inputs(v=4, b=8, k=10, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.nn.functional.normalize(torch.randn(v * b, d, generator=g), dim=1)
    protos = torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=1)
    return z, z @ protos.t(), protos


def test_queue_not_used_until_full_then_used():
    z, scores, protos = _inputs()
    plain = SwAVObjective(4, [0, 1], queue_length=0, embed_dim=6)
    queued = SwAVObjective(4, [0, 1], queue_length=16, embed_dim=6)
    queued.queue_active = True
    expected = plain(z, scores, protos)
    # first two pushes (8 each) fill the 16-long queue; while filling, the loss equals the plain loss
    for _ in range(2):
        assert torch.allclose(queued(z, scores, protos), expected)
    assert queued.queue.is_full()
    z2, scores2, _ = _inputs(seed=1)
    z2 = torch.nn.functional.normalize(z2, dim=1)
    scores2 = z2 @ protos.t()
    with_queue = queued(z2, scores2, protos)
    # reference: Sinkhorn over [queue scores; batch scores], keep the batch rows
    s = scores2.view(4, 8, 10)
    codes = []
    for j, view in enumerate([0, 1]):
        # the queue held [batch z (newest), batch z] before this call pushed z2's views
        full = torch.cat([z.view(4, 8, 6)[view] @ protos.t(), z.view(4, 8, 6)[view] @ protos.t(), s[view]])
        codes.append(sinkhorn_knopp(full)[-8:])
    ref = swapped_prediction_loss(s, torch.stack(codes), [0, 1])
    assert torch.allclose(with_queue, ref, atol=1e-6)
    assert not torch.allclose(with_queue, plain(z2, scores2, protos))


def test_inactive_queue_is_not_filled():
    z, scores, protos = _inputs()
    obj = SwAVObjective(4, [0, 1], queue_length=16, embed_dim=6)
    obj(z, scores, protos)
    assert int(obj.queue.count) == 0
