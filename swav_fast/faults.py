"""Fault injection hooks, FOR TESTS ONLY: they let tests hit a crash window or a NaN on purpose.

Nothing here does anything in a normal run: the environment variable is unset and
``train.debug_nan_steps`` / ``train.debug_blowup_steps`` are empty by default. Each hook is called
from exactly one place.
"""
from __future__ import annotations

import os
import time
from typing import Collection, Sequence

import torch

#: Seconds to sleep between writing a checkpoint's temp file and renaming it (testing only: the
#: SIGKILL test kills the process inside this window).
CHECKPOINT_PAUSE_ENV = "SWAV_FAST_TEST_CHECKPOINT_PAUSE"


def pause_in_checkpoint_write() -> None:
    """Called by :func:`swav_fast.checkpoint.atomic_save` after the temp file is written."""
    delay = os.environ.get(CHECKPOINT_PAUSE_ENV)
    if delay:
        time.sleep(float(delay))


def poison_views(views: Sequence[torch.Tensor], iteration: int,
                 nan_steps: Collection[int]) -> list[torch.Tensor]:
    """NaN in the first view at the (0-based) iterations in ``nan_steps`` (``train.debug_nan_steps``).

    The NaN enters the forward pass, so batch-norm statistics, the queue, the loss and the gradients
    all see it, as with a real numerical blow-up.
    """
    views = list(views)
    if iteration in nan_steps:
        views[0] = torch.full_like(views[0], float("nan"))
    return views


#: How much :func:`blow_up_weights` multiplies the weights by.
BLOWUP_FACTOR = 1e6


@torch.no_grad()
def blow_up_weights(params: Sequence[torch.Tensor], iteration: int, blowup_steps: Collection[int]) -> None:
    """Multiply every parameter by :data:`BLOWUP_FACTOR` before the (0-based) iterations in
    ``blowup_steps`` (``train.debug_blowup_steps``): a finite step that wrecks the weights, as a huge
    learning rate does. Called by the trainer before the step."""
    if iteration in blowup_steps:
        torch._foreach_mul_(list(params), BLOWUP_FACTOR)
