"""Learning-rate schedule: linear warmup then cosine decay, per iteration."""
from __future__ import annotations

import math


def warmup_cosine_lr(step: int, total_steps: int, warmup_steps: int, base_lr: float,
                     final_lr: float, start_warmup_lr: float = 0.0) -> float:
    r"""Learning rate at iteration ``step`` (0-based).

    .. math::
        \text{lr}(t) = \begin{cases}
        \text{start} + (\text{base}-\text{start})\,\frac{t}{W-1} & t < W \\
        \text{final} + \tfrac12(\text{base}-\text{final})\left(1+\cos\frac{\pi (t-W)}{T-W}\right) & t \ge W
        \end{cases}

    (the warmup is ``np.linspace(start, base, W)``, as in the official SwAV code: a one-iteration warmup
    is ``[start]``, so iteration 0 runs at ``start_warmup`` whatever ``W``).
    """
    if step < warmup_steps:
        if warmup_steps == 1:
            return start_warmup_lr
        return start_warmup_lr + (base_lr - start_warmup_lr) * step / (warmup_steps - 1)
    decay_steps = max(1, total_steps - warmup_steps)
    t = min(step - warmup_steps, decay_steps)
    return final_lr + 0.5 * (base_lr - final_lr) * (1 + math.cos(math.pi * t / decay_steps))
