"""Least squares under an input Gram matrix: what fitting a stored code's continuous part solves.

A linear layer ``y = W x`` run on inputs ``X`` (one row per token) errs by ``X E^T`` when its
weights err by ``E`` (rows: output features). The squared output error is
``sum_i e_i G e_i^T`` with ``G = X^T X`` (columns x columns): every row of ``E`` counts on
its own, weighted by ``G``. ``gram=None`` stands for the identity (plain squared weight error,
for matrices that are no linear layer's weight, such as embeddings).

Each function fits, per row or per matrix, the free values of a code whose discrete part
(signs, kept positions, quantization codes) is fixed, to ``target`` (float32 ``(rows, cols)``).
"""

from __future__ import annotations

import torch

# Added to G's diagonal, relative to its mean diagonal: keeps the per-row solves well posed
# when a row's kept columns are nearly collinear in the inputs (GPTQ uses the same 1%).
DAMPING = 1e-2


# The per-row systems solved at once hold at most this many float64 values (128 MiB).
SOLVE_ELEMENTS = 1 << 24


def damped(gram: torch.Tensor | None) -> torch.Tensor | None:
    """``G + DAMPING * mean(diag G) * I`` in float64 (None stays None)."""
    if gram is None:
        return None
    g = gram.double()
    diagonal = g.diagonal()
    return g + torch.diag(torch.full_like(diagonal, DAMPING * float(diagonal.mean().clamp_min(1e-30))))


def _weighted(x: torch.Tensor, gram: torch.Tensor | None) -> torch.Tensor:
    return x if gram is None else x @ gram


def error(code: torch.Tensor, target: torch.Tensor, gram: torch.Tensor | None) -> float:
    """``sum_i (c_i - t_i) G (c_i - t_i)^T``: the squared output error the code leaves."""
    e = code.double() - target.double()
    return float((_weighted(e, gram) * e).sum())


def row_scales(pattern: torch.Tensor, target: torch.Tensor, gram: torch.Tensor | None) -> torch.Tensor:
    """float64 ``(rows,)``: per row the ``a`` minimising ``(a p - t) G (a p - t)^T``, 0 for a row
    whose pattern is zero."""
    p, t = pattern.double(), target.double()
    pg = _weighted(p, gram)
    den = (pg * p).sum(dim=1)
    return torch.where(den > 0, (pg * t).sum(dim=1) / den.clamp_min(1e-300), 0.0)


def matrix_scale(pattern: torch.Tensor, target: torch.Tensor, gram: torch.Tensor | None) -> float:
    """The one ``a`` minimising ``sum_i (a p_i - t_i) G (a p_i - t_i)^T`` (0 for a zero pattern)."""
    p, t = pattern.double(), target.double()
    pg = _weighted(p, gram)
    den = float((pg * p).sum())
    return float((pg * t).sum()) / den if den > 0 else 0.0


def on_support(keep: torch.Tensor, target: torch.Tensor, gram: torch.Tensor | None) -> torch.Tensor:
    """float32 ``(rows, cols)``: per row the values on the kept columns ``K`` (zero elsewhere)
    minimising ``(x - t) G (x - t)^T``: ``x_K = G_KK^-1 (G t)_K``. The kept values take over
    what the dropped ones did to the outputs (with ``G = I``, simply ``t_K``). Rows are solved
    in batches of equal kept count."""
    if gram is None:
        return torch.where(keep, target, 0.0)
    g = gram.double()
    gt = target.double() @ g
    out = torch.zeros(target.shape, dtype=torch.float64, device=target.device)
    counts = keep.sum(dim=1)
    for count in torch.unique(counts).tolist():
        if count == 0:
            continue
        same = (counts == count).nonzero().flatten()
        step = max(1, SOLVE_ELEMENTS // (count * count))
        for first in range(0, len(same), step):
            rows = same[first:first + step]
            # Kept columns of each row, in column order: (n, count).
            cols = keep[rows].nonzero()[:, 1].view(len(rows), count)
            system = g[cols[:, :, None], cols[:, None, :]]
            rhs = gt[rows[:, None], cols]
            out[rows[:, None], cols] = torch.linalg.solve(system, rhs.unsqueeze(-1)).squeeze(-1)
    return out.float()
