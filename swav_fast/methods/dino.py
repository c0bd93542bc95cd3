"""DINO (Caron et al., 2021): self-distillation with no labels; an EMA teacher, centred and sharpened."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from swav_fast.distributed import all_reduce_, world_size
from swav_fast.losses.dino import dino_loss, updated_center
from swav_fast.methods.base import Method, head_sizes, per_view, register_method
from swav_fast.methods.configs import DINOConfig, estimated_total_steps, method_config, num_global_views
from swav_fast.methods.momentum import EMATarget
from swav_fast.models.predictor import DINOHead, EncoderNet


def teacher_temperature(epoch: int, teacher_temp: float, warmup_temp: float, warmup_epochs: int) -> float:
    """Linear from ``warmup_temp`` (epoch 0) to ``teacher_temp`` (epoch ``warmup_epochs - 1``), then flat."""
    if epoch >= warmup_epochs:
        return teacher_temp
    if warmup_epochs == 1:
        return warmup_temp
    return warmup_temp + (teacher_temp - warmup_temp) * epoch / (warmup_epochs - 1)


class DINO(Method):
    r"""Student ``model`` (trunk + :class:`~swav_fast.models.predictor.DINOHead`) on all views, EMA
    teacher on the G global views; loss :func:`~swav_fast.losses.dino.dino_loss`.

    Before the optimiser step each parameter's gradient is clipped to norm ``clip_grad`` (3.0; 0 = off);
    the last layer is frozen during the first ``freeze_last_layer_epochs`` (:meth:`frozen_parameters`,
    which the step applies). After the optimiser step the teacher moves by EMA (0.996 -> 1, cosine)
    and the centre by :func:`~swav_fast.losses.dino.updated_center` with this step's mean teacher
    output (all-reduced). The teacher temperature (warm-up) changes per epoch (:meth:`on_epoch_start`)
    and is held in a device buffer, so the step itself has no Python branch.
    """

    name = "dino"

    def __init__(self, model: EncoderNet, out_dim: int, num_globals: int = 2, student_temp: float = 0.1,
                 teacher_temp: float = 0.04, warmup_teacher_temp: float = 0.04,
                 warmup_teacher_temp_epochs: int = 0,
                 center_momentum: float = 0.9, base_momentum: float = 0.996, final_momentum: float = 1.0,
                 total_steps: int = 0, freeze_last_layer_epochs: int = 1, clip_grad: float = 3.0,
                 epochs: int = 1):
        super().__init__()
        self.model = model
        self.target = EMATarget(model, base_momentum, final_momentum, total_steps)
        self.num_globals = num_globals
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.freeze_last_layer_epochs = freeze_last_layer_epochs
        self.epochs = max(1, epochs)
        self.steps_per_epoch = total_steps // self.epochs
        self.clip_grad = clip_grad
        self.temperature_schedule = (teacher_temp, warmup_teacher_temp, warmup_teacher_temp_epochs)
        self.register_buffer("center", torch.zeros(out_dim))
        self.register_buffer("teacher_temp", torch.tensor(0.0), persistent=False)
        self._pending_center: torch.Tensor | None = None
        self.on_epoch_start(0)

    def on_epoch_start(self, epoch: int) -> None:
        self.teacher_temp.fill_(teacher_temperature(epoch, *self.temperature_schedule))

    def frozen_parameters(self) -> list[tuple[list[torch.nn.Parameter], int]]:
        """The last layer, for the first ``freeze_last_layer_epochs`` epochs' iterations."""
        until = self.freeze_last_layer_epochs * self.steps_per_epoch
        return [(list(self.model.head.last_layer.parameters()), until)] if until > 0 else []

    def forward(self, views: Sequence[torch.Tensor], indices: torch.Tensor | None = None) -> torch.Tensor:
        num_views, num_globals = len(views), min(self.num_globals, len(views))
        s = self.model(views)
        s = per_view(s, num_views)
        t = self.target(views[:num_globals]).float()
        t = per_view(t, num_globals)
        loss = dino_loss(s, t, self.center, self.student_temp, self.teacher_temp)
        count = t.shape[0] * t.shape[1] * world_size()
        self._pending_center = all_reduce_(t.sum(dim=(0, 1))) / count
        return loss

    def before_update(self, step: torch.Tensor) -> None:
        """Per-parameter gradient clipping to norm ``clip_grad`` (the paper's, applied to each
        parameter separately)."""
        if self.clip_grad > 0:
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            if grads:
                norms = torch._foreach_norm(grads)
                torch._foreach_mul_(grads, [(self.clip_grad / (n + 1e-6)).clamp(max=1.0) for n in norms])

    def after_update(self, step: torch.Tensor) -> None:
        self.target.update_(self.model, step)
        if self._pending_center is not None:
            self.center.copy_(updated_center(self.center, self._pending_center, self.center_momentum))
            self._pending_center = None

    def on_train_start(self, num_samples: int, total_steps: int) -> None:
        self.target.schedule.set_total_steps(total_steps)
        self.steps_per_epoch = total_steps // self.epochs


@register_method("dino", optim="exclude_bias_and_norm", heads=(2048, 256), config=DINOConfig,
                 paper="Caron et al. 2021, Emerging Properties in Self-Supervised Vision Transformers",
                 state="the EMA teacher, the centre and the momentum schedule",
                 ddp="the centre's batch mean all-reduced; teacher updated identically on every rank")
def build_dino(cfg: Any) -> DINO:
    mc = method_config(cfg, "dino")
    m = cfg.model
    hidden, feat = head_sizes(cfg, "dino")
    model = EncoderNet(m.arch, lambda d: DINOHead(
        d, hidden, feat, mc.out_dim, mc.projector_layers, batch_norm=mc.batch_norm,
        norm_last_layer=mc.norm_last_layer))
    return DINO(model, mc.out_dim, num_global_views(cfg), mc.student_temp, mc.teacher_temp,
                mc.warmup_teacher_temp, mc.warmup_teacher_temp_epochs, mc.center_momentum, mc.base_momentum,
                mc.final_momentum, estimated_total_steps(cfg), mc.freeze_last_layer_epochs, mc.clip_grad,
                cfg.optim.epochs)
