"""Sinkhorn-Knopp equipartition of a batch over the prototypes (SwAV's online codes)."""
from __future__ import annotations

import torch

from swav_fast.distributed import all_reduce_, world_size


@torch.no_grad()
def sinkhorn_knopp(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    r"""Soft codes Q for prototype scores, equipartitioned over the (global) batch.

    With scores :math:`S \in \mathbb{R}^{B \times K}` (cosine similarities of B samples to K prototypes)
    and :math:`B_g = B \cdot \text{world}`:

    .. math::
        Q = \exp(S / \varepsilon)^\top / \textstyle\sum \exp(S/\varepsilon)\\
        \text{repeat } n: \quad Q_{k\cdot} \leftarrow \frac{Q_{k\cdot}}{K \sum_b Q_{kb}} \;(\text{rows, all-reduced}),
        \qquad Q_{\cdot b} \leftarrow \frac{Q_{\cdot b}}{B_g \sum_k Q_{kb}} \;(\text{columns, local})\\
        \text{return } (B_g\, Q)^\top \quad (\text{each sample's code sums to } 1)

    Computed in float32 whatever the autocast dtype (``exp(1/0.05)`` overflows fp16). The global
    maximum score is subtracted first: this cancels in the first normalisation, so the result is
    unchanged but scores far outside [-1, 1] cannot overflow. Under ``torch.distributed`` the total
    and the row sums are all-reduced, so each rank gets its own rows of the global solution.

    Args:
        scores: ``[B, K]`` scores of the local batch (queue rows included, if any).
        epsilon: entropic regularisation; smaller is sharper.
        iterations: number of row/column normalisation rounds.
    Returns:
        ``[B, K]`` float32 codes, rows summing to 1.
    """
    with torch.autocast(device_type=scores.device.type, enabled=False):
        scores = scores.float()
        shift = all_reduce_(scores.max().reshape(1), op="max")
        q = torch.exp((scores - shift) / epsilon).t()  # K x B
        num_prototypes = q.shape[0]
        global_batch = q.shape[1] * world_size()
        q /= all_reduce_(q.sum().reshape(1))
        for _ in range(iterations):
            q /= all_reduce_(q.sum(dim=1, keepdim=True))
            q /= num_prototypes
            q /= q.sum(dim=0, keepdim=True)
            q /= global_batch
        q *= global_batch
        return q.t()
