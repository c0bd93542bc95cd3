"""Training-step modes: ``compile`` and ``graph`` run the maths of ``eager`` (losses, updated parameters,
prototype freeze, queue start, NaN guard), with every decision on the device.

CPU tests compile with the ``aot_eager`` backend and ``fullgraph=True`` (dynamo + AOTAutograd: the whole
forward + fused loss traces without a graph break; inductor's CPU code generation for a whole network
takes minutes on 2 cores, its numerics are covered by test_fused_loss.py). GPU tests (``-m gpu``) use
the default inductor backend and CUDA graphs.
"""
from __future__ import annotations

import logging

import pytest
import torch

from swav_fast.config import load_config
from swav_fast.errors import ConfigError
from swav_fast.run import check_config
from swav_fast.methods.swav import SwAVMethod, SwAVObjective
from swav_fast.models import SwAVModel
from swav_fast.optim import LARS, lars_param_groups
from swav_fast.step import MODES, TrainStep, graph_unsupported_reason
from tests.helpers import tiny_config, write_image_folder

CPU = torch.device("cpu")
AOT = {"backend": "aot_eager", "fullgraph": True}
FREEZE, QUEUE_FROM = 2, 2  # prototypes frozen for iterations 0, 1; queue on from iteration 2
BATCH, QUEUE = 8, 16  # the queue is full after two pushes: used from iteration 4 on


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def make_method(arch: str = "resnet10_half", seed: int = 0) -> SwAVMethod:
    torch.manual_seed(seed)
    model = SwAVModel(arch, hidden_dim=32, out_dim=16, num_prototypes=20)
    objective = SwAVObjective(4, [0, 1], queue_length=QUEUE, embed_dim=16)
    return SwAVMethod(model, objective, freeze_prototypes_niters=FREEZE, epoch_queue_starts=1)


def make_step(method: SwAVMethod, mode: str, device=CPU, **kw) -> TrainStep:
    opt = LARS(lars_param_groups(method.model), lr=0.1, momentum=0.9, weight_decay=1e-4)
    kw.setdefault("precision", "fp32")
    return TrainStep(method.to(device), opt, device, mode=mode, **kw)


def batches(n: int, sizes=(16, 8), device=CPU, seed: int = 1) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(BATCH, 3, s, s, generator=g).to(device) for s in (sizes[0],) * 2 + (sizes[1],) * 2]
            for _ in range(n)]


def lr_at(it: int) -> float:
    return 0.5 - 0.05 * it


def run(step: TrainStep, data: list[list[torch.Tensor]], start: int = 0) -> list[torch.Tensor]:
    """Steps ``start..`` over ``data`` with the queue switched on at QUEUE_FROM (as the trainer's epochs)."""
    losses = []
    for it, views in enumerate(data, start):
        step.method.on_epoch_start(1 if it >= QUEUE_FROM else 0)
        losses.append(step(views, lr_at(it), it))
    return losses


def momentum(step: TrainStep, p: torch.nn.Parameter) -> torch.Tensor:
    buf = step.optimizer.state.get(p, {}).get("momentum_buffer")
    return torch.zeros_like(p) if buf is None else buf


def assert_same_training(a: TrainStep, b: TrainStep, rtol: float, atol: float) -> None:
    """Parameters, BN statistics, queue and momentum of two steps' methods agree."""
    for (name, x), y in zip(a.method.state_dict().items(), b.method.state_dict().values()):
        torch.testing.assert_close(y.float(), x.float(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
    for p, q in zip(a.method.model.parameters(), b.method.model.parameters()):
        torch.testing.assert_close(momentum(b, q), momentum(a, p), rtol=rtol, atol=atol)


# -- CPU ---------------------------------------------------------------------------------------------
def test_modes_and_config_key():
    assert MODES == ("eager", "compile", "graph")
    cfg = load_config("quick", ["train.step_mode=graph"]).validate()
    assert cfg.train.step_mode == "graph"
    with pytest.raises(ConfigError, match="train.step_mode='fast' is not valid; valid: compile, eager, graph"):
        check_config(load_config("quick", ["train.step_mode=fast"]))  # a registry check: at composition
    with pytest.raises(ConfigError, match="unknown step mode 'fast'"):
        make_step(make_method(), "fast")


def test_compile_matches_eager_across_freeze_and_queue_start():
    """Six steps: prototypes frozen, then trained; queue off, filling, then used in Sinkhorn."""
    eager = make_step(make_method(), "eager")
    comp = make_step(make_method(), "compile", compile_options=AOT)
    protos0 = comp.method.model.prototypes.weight.detach().clone()
    data = batches(6)
    for it, views in enumerate(data):
        for s in (eager, comp):
            s.method.on_epoch_start(1 if it >= QUEUE_FROM else 0)
        le, lc = eager(views, lr_at(it), it), comp(views, lr_at(it), it)
        torch.testing.assert_close(lc, le, rtol=1e-5, atol=0)
        protos = comp.method.model.prototypes
        if it < FREEZE:  # frozen: no update and no momentum, as in eager (where they get no gradient)
            assert torch.equal(protos.weight.detach(), protos0)
            assert not momentum(comp, protos.weight).any()
            assert protos.weight not in eager.optimizer.state
        assert_same_training(eager, comp, rtol=1e-4, atol=1e-5)
    assert not torch.equal(comp.method.model.prototypes.weight.detach(), protos0)
    assert int(comp.method.objective.queue.count) == (6 - QUEUE_FROM) * BATCH
    assert comp.stats.mode == "compile" and comp.stats.compile_s is not None
    # the optimiser reads the learning rate from a device tensor during the step only
    assert all(isinstance(g["lr"], float) for g in comp.optimizer.state_dict()["param_groups"])
    assert comp.optimizer.param_groups[0]["lr"] == lr_at(5)


def test_compile_mode_nan_step_changes_nothing():
    step = make_step(make_method(), "compile", compile_options={"backend": "eager"}, debug_nan_steps=[3])
    data = batches(5)
    run(step, data[:3])
    before = {k: v.clone() for k, v in step.method.state_dict().items()}
    moms = [momentum(step, p).clone() for p in step.method.model.parameters()]
    step.method.on_epoch_start(1)
    loss = step(data[3], 0.3, 3)
    assert not torch.isfinite(loss)
    for k, v in step.method.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed in a NaN step"
    assert all(torch.equal(momentum(step, p), m) for p, m in zip(step.method.model.parameters(), moms))
    assert torch.isfinite(step(data[4], 0.3, 4))
    counts = step.guard.counts()
    assert (counts.total, counts.streak, counts.worst_streak) == (1, 0, 1)


def test_graph_mode_on_cpu_runs_the_compiled_step_and_says_why(caplog):
    with caplog.at_level(logging.INFO, logger="swav_fast"):
        step = make_step(make_method(), "graph", compile_options={"backend": "eager"})
    assert step.mode == "compile" and step.stats.requested_mode == "graph"
    assert "CUDA" in step.stats.fallback_reason
    messages = [r.getMessage() for r in caplog.records]
    assert any("compile instead of graph" in m and "CUDA" in m for m in messages)
    ref = make_step(make_method(), "eager")
    data = batches(3)
    for a, b in zip(run(step, data), run(ref, data)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=0)
    assert step.input_buffers() is None and step.stats.captures == 0


@pytest.mark.parametrize("case,needle", [
    ("cpu", "CUDA device"), ("fp16", "gradient scaler"), ("sgd", "SGD reads its learning rate"),
])
def test_graph_unsupported_reasons(case, needle):
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=0.1) if case == "sgd" else LARS([p], lr=0.1)
    device = torch.device("cpu" if case == "cpu" else "cuda")
    reason = graph_unsupported_reason(device, opt, scaler_enabled=case == "fp16")
    assert reason is not None and needle in reason


def test_lars_with_a_device_lr_tensor_equals_a_float_lr():
    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 3))
            for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    lr = torch.zeros(())
    opts = [LARS(lars_param_groups(n), lr=0.1, weight_decay=1e-3) for n in nets]
    for g in opts[1].param_groups:
        g["lr"] = lr
    for it in range(4):
        x = torch.randn(8, 6)
        lr.fill_(0.4 / (it + 1))
        for n, o in zip(nets, opts):
            if o is opts[0]:
                for g in o.param_groups:
                    g["lr"] = 0.4 / (it + 1)
            o.zero_grad()
            n(x).pow(2).sum().backward()
            o.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):  # p - lr*m rounds once or twice: ulps
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_checkpoint_keys_unchanged():
    method = make_method()
    assert list(method.extra_state_dict()) == ["objective.queue.items", "objective.queue.count"]
    method.set_fused(True)
    method.on_epoch_start(5)
    assert list(method.extra_state_dict()) == ["objective.queue.items", "objective.queue.count"]
    assert method.objective.fused and method.objective.queue_active


# -- GPU ---------------------------------------------------------------------------------------------
CUDA = torch.device("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("precision,channels_last,rtol", [("fp32", False, 1e-4), ("bf16", True, 3e-2)])
def test_graph_matches_eager_over_freeze_and_queue_start(exact_cuda, precision, channels_last, rtol):
    kw = dict(precision=precision, channels_last=channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    eager = make_step(make_method("resnet18").to(memory_format=fmt), "eager", CUDA, **kw)
    graph = make_step(make_method("resnet18").to(memory_format=fmt), "graph", CUDA, **kw)
    data = batches(8, sizes=(64, 32), device=CUDA)
    for it, views in enumerate(data):
        for s in (eager, graph):
            s.method.on_epoch_start(1 if it >= QUEUE_FROM else 0)
        le, lg = eager(views, lr_at(it), it), graph(views, lr_at(it), it)
        torch.testing.assert_close(lg, le, rtol=rtol, atol=0)
        if precision == "fp32":
            assert_same_training(eager, graph, rtol=1e-3, atol=1e-4)
    assert graph.mode == "graph", graph.stats.fallback_reason
    assert graph.stats.captures == 1 and graph.stats.replays == 8 and graph.stats.uncaptured_steps == 0
    assert graph.stats.capture_s is not None and graph.stats.compile_s is not None
    assert int(graph.method.objective.queue.count) == (8 - QUEUE_FROM) * BATCH
    protos = graph.method.model.prototypes.weight
    ones = torch.ones(protos.shape[0], device=CUDA)
    torch.testing.assert_close(protos.norm(dim=1), ones, rtol=0, atol=1e-5)


@pytest.mark.gpu
def test_no_recapture_during_a_trainer_run(tmp_path):
    """Two epochs with the prototype-freeze boundary, the queue start at epoch 1, checkpoints and a NaN
    step: one capture, every step a replay."""
    from swav_fast.train import Trainer

    data = write_image_folder(tmp_path / "data")  # 24 images, batch 8: 3 steps per epoch
    trainer = Trainer(tiny_config(data, tmp_path / "run", "train.device=cuda", "train.step_mode=graph",
                                  "methods.swav.queue_length=16", "methods.swav.epoch_queue_starts=1",
                                  "optim.epochs=3",
                                  "train.debug_nan_steps=[4]", "train.checkpoint_every_steps=2"))
    result = trainer.fit()
    stats = trainer.step_fn.stats
    assert stats.mode == "graph", stats.fallback_reason
    assert (stats.captures, stats.replays, stats.uncaptured_steps) == (1, 9, 0)
    assert result.steps == 9 and result.nonfinite_steps == 1
    assert int(trainer.method.objective.queue.count) == 5 * 8  # epochs 1 and 2, less the NaN step's push


def _loader_thread_batches(step: TrainStep, data, direct: bool):
    """A loader on its own stream that reuses ONE buffer set (its own, or the step's static inputs),
    delaying every write with a sleep kernel so that a missing wait would corrupt a replay."""
    side = torch.cuda.Stream()
    own = [torch.empty_like(v) for v in data[0]]
    for views in data:
        target, done = own, step.inputs_consumed
        if direct and step.input_buffers() is not None:
            target, done = step.input_buffers()[0], step.input_buffers_free
        with torch.cuda.stream(side):
            if done is not None:
                side.wait_event(done)  # the step is done reading these buffers
            torch.cuda._sleep(2_000_000)  # ~1 ms: a slow decoder
            for t, v in zip(target, views):
                t.copy_(v)
        torch.cuda.current_stream().wait_stream(side)  # the batch is ready
        yield target


@pytest.mark.gpu
@pytest.mark.parametrize("direct", [False, True])
def test_loader_buffers_are_not_overwritten_while_read(exact_cuda, direct):
    data = batches(6, sizes=(64, 32), device=CUDA)
    ref = make_step(make_method("resnet18"), "graph", CUDA)
    expected = [ref([v.clone() for v in views], lr_at(it), it) for it, views in enumerate(data)]
    step = make_step(make_method("resnet18"), "graph", CUDA)
    got = [step(views, lr_at(it), it) for it, views in enumerate(_loader_thread_batches(step, data, direct))]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    assert step.stats.captures == 1


@pytest.mark.gpu
def test_capture_failure_falls_back_to_the_compiled_step(exact_cuda, caplog):
    """A forward that syncs the host cannot be captured: warm-up is undone, the compiled step runs,
    the log says why, and training equals the compiled mode."""

    class Syncing(SwAVMethod):
        def after_update(self, step):  # a hook outside the compiled region
            super().after_update(step)
            if torch.cuda.is_current_stream_capturing():
                step.item()  # a host read: illegal while capturing

    def syncing(seed=0):
        m = make_method("resnet18", seed)
        return Syncing(m.model, m.objective, FREEZE, 1)

    data = batches(4, sizes=(64, 32), device=CUDA)
    with caplog.at_level(logging.WARNING, logger="swav_fast"):
        step = make_step(syncing(), "graph", CUDA)
        losses = run(step, data)
    assert step.mode == "compile" and "capture failed" in step.stats.fallback_reason
    assert any("compile instead of graph" in r.getMessage() for r in caplog.records)
    ref = make_step(syncing(), "compile", CUDA)
    for a, b in zip(losses, run(ref, data)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=0)
    assert_same_training(ref, step, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_odd_batch_runs_uncaptured_and_fp16_falls_back(exact_cuda):
    step = make_step(make_method("resnet18"), "graph", CUDA)
    data = batches(2, sizes=(64, 32), device=CUDA)
    step.method.on_epoch_start(0)
    step(data[0], 0.1, 0)
    step([v[:4] for v in data[1]], 0.1, 1)  # a smaller last batch
    assert (step.stats.captures, step.stats.replays, step.stats.uncaptured_steps) == (1, 1, 1)
    half = make_step(make_method("resnet18"), "graph", CUDA, precision="fp16")
    assert half.mode == "compile" and "gradient scaler" in half.stats.fallback_reason


class _GradNormProbe(SwAVMethod):
    """Records the gradient norm that ``before_update`` sees (where DINO clips its gradients)."""

    def before_update(self, step: torch.Tensor) -> None:
        super().before_update(step)
        grads = [p.grad.float() for p in self.model.parameters() if p.grad is not None]
        self.seen = torch.stack(torch._foreach_norm(grads)).norm().item()


@pytest.mark.parametrize("mode", ["eager", "compile"])
def test_fp16_hooks_see_unscaled_gradients(mode):
    """With fp16 the loss is scaled for backward; before_update must see the true gradients."""
    seen = {}
    for precision in ("fp32", "fp16"):
        base = make_method()
        method = _GradNormProbe(base.model, base.objective, FREEZE, 1)
        step = make_step(method, mode, precision=precision, compile_options={"backend": "eager"})
        assert step.scaler.is_enabled() == (precision == "fp16")
        if step.scaler.is_enabled():  # 2**16 overflows this tiny net's fp16 gradients at once
            step.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
        step(batches(1)[0], 0.1, 5)
        seen[precision] = method.seen
    assert seen["fp32"] > 0
    assert 0.5 < seen["fp16"] / seen["fp32"] < 2.0, seen  # scaled gradients would be 256x
