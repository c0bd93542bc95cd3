r"""SwAV's Sinkhorn codes and swapped-prediction loss as one function that ``torch.compile`` fuses.

:func:`fused_swav_loss` computes the same quantities as
:func:`~swav_fast.losses.sinkhorn.sinkhorn_knopp` followed by
:func:`~swav_fast.losses.swav.swapped_prediction_loss` (and the queue handling of
:class:`~swav_fast.methods.swav.SwAVObjective`), rearranged so that the compiler needs only a few
memory passes and so that nothing depends on a host-side decision:

* **Sinkhorn as two scaling vectors.** With :math:`P = \exp((S - \max S)/\varepsilon)` (``[N, K]``,
  N samples, K prototypes) every Sinkhorn iterate is :math:`Q = \operatorname{diag}(c)\,P\,
  \operatorname{diag}(r)` (samples x prototypes). The row (prototype) step sets
  :math:`r_k = 1 / (K \sum_n c_n P_{nk})` and the column (sample) step
  :math:`c_n = 1 / (N \sum_k P_{nk} r_k)`; the initial division by :math:`\sum Q` and the previous
  value of the vector being normalised both cancel. The returned codes (the last column step, times
  N) are :math:`q_n = P_{n\cdot} \odot r / \sum_k P_{nk} r_k`. Only ``P`` (recomputed from ``S`` by the
  compiler) and two vectors are touched: no ``[K, N]`` transpose, no in-place updates of ``Q``.
* **Masked rows for the queue.** Queue rows take part only when a 0-d device flag says so (the queue
  is active and full): they get weight :math:`w_n = 0`, which removes them from every sum, and
  :math:`N = \sum_n w_n`. This equals running Sinkhorn on the active rows alone, so one captured
  CUDA graph serves the epochs before and after the queue starts.
* **Loss without materialising log-probabilities.** With :math:`x = s/\tau`,
  :math:`\sum_k q_k \log\operatorname{softmax}(x)_k = q\cdot x - \operatorname{lse}(x)\sum_k q_k`,
  so the cross entropy of every (assigned view, view) pair is two reductions: a
  ``[A, B*K] x [B*K, V]`` product and a log-sum-exp per row.

Everything runs in float32 whatever the autocast dtype (float64 inputs stay float64, which the tests
use to compare with formula references). Under ``torch.distributed`` the maximum, the prototype sums
and the sample count are all-reduced, as in the eager function.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from swav_fast.distributed import all_reduce_, world_size


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


@torch.no_grad()
def sinkhorn_codes(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3,
                   weights: torch.Tensor | None = None) -> torch.Tensor:
    r"""Sinkhorn-Knopp codes of ``scores`` ``[..., N, K]`` (independent problems along leading dims).

    The same result as :func:`~swav_fast.losses.sinkhorn.sinkhorn_knopp` on each ``[N, K]`` matrix
    (scaling-vector form, see the module docstring). ``weights`` ``[N]`` (0 or 1, or ``None`` for
    all ones) drops rows from the problem: the codes of dropped rows are 0, and the other rows get
    exactly the codes of Sinkhorn on the kept rows alone.

    Returns:
        ``[..., N, K]`` codes in float32 (float64 for float64 input), rows of kept samples summing to 1.
    """
    with torch.autocast(device_type=scores.device.type, enabled=False):
        dtype = _compute_dtype(scores.dtype)
        s = scores.to(dtype)
        num_prototypes = s.shape[-1]
        if weights is None:
            shift = s.amax(dim=(-2, -1), keepdim=True)
            w = None
            count: torch.Tensor | float = float(s.shape[-2] * world_size())
        else:
            w = weights.to(dtype)
            keep = (w > 0)[:, None]
            shift = torch.where(keep, s, torch.finfo(dtype).min).amax(dim=(-2, -1), keepdim=True)
            count = all_reduce_(w.sum().reshape(1)).reshape(())
        shift = all_reduce_(shift, op="max")
        p = torch.exp((s - shift) / epsilon)  # [..., N, K]
        if w is not None:
            p = torch.where(keep, p, 0.0)
        c = None  # sample scalings; all ones before the first column step
        r = None
        for i in range(iterations):
            proto_sums = p.sum(dim=-2) if c is None else (p * c[..., :, None]).sum(dim=-2)  # [..., K]
            r = 1.0 / (num_prototypes * all_reduce_(proto_sums))
            if i + 1 < iterations:
                sample_sums = (p * r[..., None, :]).sum(dim=-1)  # [..., N]
                if w is not None:  # dropped rows: sum 0, weight 0
                    sample_sums = torch.where(w > 0, sample_sums, 1.0)
                    c = w / (count * sample_sums)
                else:
                    c = 1.0 / (count * sample_sums)
        q = p * r[..., None, :]
        norm = q.sum(dim=-1, keepdim=True)
        if w is not None:
            norm = torch.where(keep, norm, 1.0)
        return q / norm


def swapped_loss_from_codes(scores: torch.Tensor, codes: torch.Tensor, crops_for_assign: Sequence[int],
                            temperature: float = 0.1) -> torch.Tensor:
    r"""The swapped-prediction loss of :func:`~swav_fast.losses.swav.swapped_prediction_loss`.

    .. math::
        \text{cross}[j, v] = \frac{1}{B}\sum_b \Big(\operatorname{lse}(x_{vb}) \sum_k q_{jb k}
        - \sum_k q_{jbk}\, x_{vbk}\Big), \quad x = s/\tau, \qquad
        \mathcal{L} = \frac{1}{A (V-1)} \sum_j \sum_{v \ne a_j} \text{cross}[j, v]

    Args:
        scores: ``[V, B, K]`` prototype scores of all views (gradients flow into them).
        codes: ``[A, B, K]`` codes of the assigned views (treated as constants).
    """
    with torch.autocast(device_type=scores.device.type, enabled=False):
        dtype = _compute_dtype(scores.dtype)
        num_views, batch = scores.shape[0], scores.shape[1]
        x = scores.to(dtype) / temperature
        q = codes.detach().to(dtype)
        lse = torch.logsumexp(x, dim=-1)  # [V, B]
        # the sums over b (and k) accumulated in float64: the loss keeps float32 accuracy
        dots = torch.einsum("abk,vbk->av", q.double(), x.double())  # [A, V]
        lse_terms = torch.einsum("ab,vb->av", q.sum(dim=-1).double(), lse.double())  # [A, V]
        cross = (lse_terms - dots) / batch
        # the pairs (j, a_j) are left out: subtract them (Python indices, nothing copied to the device)
        own = sum(cross[j, view] for j, view in enumerate(crops_for_assign))
        return ((cross.sum() - own) / (num_views - 1) / len(crops_for_assign)).to(dtype)


def fused_swav_loss(scores: torch.Tensor, crops_for_assign: Sequence[int], temperature: float = 0.1,
                    epsilon: float = 0.05, iterations: int = 3, queue_scores: torch.Tensor | None = None,
                    use_queue: torch.Tensor | None = None) -> torch.Tensor:
    r"""SwAV loss of all views: Sinkhorn codes of the assigned views, then swapped prediction.

    Args:
        scores: ``[V, B, K]`` prototype scores of all views (view-major).
        crops_for_assign: the A views whose codes are predicted.
        temperature, epsilon, iterations: :math:`\tau`, :math:`\varepsilon` and the Sinkhorn rounds.
        queue_scores: ``[A, L, K]`` scores of the queued embeddings of each assigned view (or None).
        use_queue: 0-d bool device tensor: prepend the queue rows to the Sinkhorn problem (a masked
            problem when False, so the computation is the same kernels either way).
    Returns:
        Scalar loss in float32 (float64 for float64 scores).
    """
    assigned = torch.stack([scores[i].detach() for i in crops_for_assign])  # [A, B, K]
    batch = assigned.shape[1]
    if queue_scores is None:
        codes = sinkhorn_codes(assigned, epsilon, iterations)
    else:
        length = queue_scores.shape[1]
        dtype = _compute_dtype(assigned.dtype)
        flag = torch.ones((), dtype=torch.bool, device=scores.device) if use_queue is None else use_queue
        weights = torch.cat([flag.to(dtype).expand(length),
                             torch.ones(batch, dtype=dtype, device=scores.device)])
        stacked = torch.cat([queue_scores.detach().to(dtype), assigned.to(dtype)], dim=1)
        codes = sinkhorn_codes(stacked, epsilon, iterations, weights)[:, length:]
    return swapped_loss_from_codes(scores, codes, crops_for_assign, temperature)


_COMPILED: dict[str, Callable] = {}


def compiled(name: str = "loss", **compile_kwargs) -> Callable:
    """``torch.compile`` of :func:`fused_swav_loss` (``name="loss"``) or :func:`sinkhorn_codes`
    (``"codes"``), built once per name and options (compilation itself happens at the first call)."""
    fns = {"loss": fused_swav_loss, "codes": sinkhorn_codes}
    if name not in fns:
        raise ValueError(f"unknown fused function {name!r}; valid: {', '.join(fns)}")
    key = f"{name}:{sorted(compile_kwargs.items())}"
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fns[name], dynamic=False, **compile_kwargs)
    return _COMPILED[key]
