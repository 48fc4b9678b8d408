"""Dynamic Base Model Shift, tensor by tensor (METHOD.md; specs/format.md, "Reconstruction").

For one weight matrix (flattened to 2-D ``(rows, cols)``, float32):

    D        = W_t - W_pre                                   the finetune's delta
    m        = rows of D holding any non-zero                 the changed-row mask
    R        = D[m] - lam1 * tau[m]                           the residual to compress
    W_t'     = W_pre;  W_t'[m] += lam1 * tau[m] + lam2 * C(R) the reconstruction

Rows the finetune left exactly unchanged stay exactly ``W_pre``: neither the base vector
nor a BitDelta scale is smeared over them. The base vector uses the same row structure:
``tau = BitDelta(mean_t D_t)`` on the rows where the mean delta is non-zero, 0 elsewhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .compressors import Compressor, Encoded
from .compressors.bitdelta import BitDelta

# A base vector is BitDelta of the mean delta (specs/format.md §5.4), whatever the tasks use.
BASE_COMPRESSOR = BitDelta.name


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """View a tensor of 2+ dimensions as ``(shape[0], prod(shape[1:]))``."""
    return t.reshape(t.shape[0], -1)


def changed_rows(delta: torch.Tensor) -> torch.Tensor:
    """bool ``(rows,)``: True where a row of the 2-D ``delta`` holds any non-zero value."""
    return (delta != 0).any(dim=1)


@dataclass
class MatrixCode:
    """A compressed 2-D matrix: changed-row mask plus the compressor's encoding of those rows."""

    rows: torch.Tensor  # bool (rows,)
    encoded: Encoded


def encode_rows(compressor: Compressor, x: torch.Tensor, rows: torch.Tensor, *, seed: int) -> MatrixCode:
    """Compress the rows of ``x`` (float32 2-D) selected by ``rows`` (bool)."""
    return MatrixCode(rows, compressor.encode(x[rows].contiguous(), seed=seed))


def build_base(mean_delta: torch.Tensor, row_fraction: float = 1.0) -> MatrixCode:
    """``tau_base`` for one matrix: BitDelta of the mean delta over its non-zero rows, or over
    the ``ceil(row_fraction * n)`` of those ``n`` rows with the largest energy ``sum(mean^2)``
    (a sparse base: 1 bit per element of the rows it keeps, 0 elsewhere)."""
    rows = changed_rows(mean_delta)
    if row_fraction < 1.0:
        rows = top_energy_rows(mean_delta, rows, row_fraction)
    return encode_rows(BitDelta(), mean_delta, rows, seed=0)


def top_energy_rows(x: torch.Tensor, rows: torch.Tensor, fraction: float) -> torch.Tensor:
    """The ``ceil(fraction * count(rows))`` rows of ``rows`` (bool) where ``x`` (2-D) has the
    largest ``sum(x^2)``; ties go to the lower row index, so the choice is a function of ``x``.

    The energies are float64 sums of one row each; torch sums a row of at most
    ``SERIAL_SUM`` elements on one thread, so their bits, hence the rows chosen, do not depend
    on the number of threads (a base built on Dask workers keeps the same rows)."""
    count = int(rows.sum())
    keep = math.ceil(fraction * count)
    if keep >= count:
        return rows
    energy = x.double().pow(2).sum(dim=1)
    energy[~rows] = -1.0  # below every changed row's energy (>= 0)
    order = torch.sort(-energy, stable=True).indices  # stable: equal energies keep index order
    chosen = torch.zeros_like(rows)
    chosen[order[:keep]] = True
    return chosen


def expand_rows(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Scatter ``(changed_rows, cols)`` back to ``(rows, cols)`` with zeros elsewhere."""
    full = values.new_zeros((rows.numel(), values.shape[1]))
    full[rows] = values
    return full


class Lam1Accumulator:
    """The closed-form ``lam1 = <D, tau> / <tau, tau>`` over all matrices (METHOD.md step 5).

    Only the rows the task changed count: the other rows are rebuilt exactly as ``W_pre``
    whatever lam1 is, so they must not pull it. Inner products accumulate in float64.
    """

    def __init__(self) -> None:
        self.dot = 0.0
        self.norm = 0.0
        self.per_tensor: dict[str, float] = {}

    def add(self, name: str, delta: torch.Tensor, tau: torch.Tensor, rows: torch.Tensor) -> None:
        d = delta[rows].double()
        t = tau[rows].double()
        dot, norm = float((d * t).sum()), float((t * t).sum())
        self.dot += dot
        self.norm += norm
        self.per_tensor[name] = dot / norm if norm > 0 else 0.0

    @property
    def lam1(self) -> float:
        return self.dot / self.norm if self.norm > 0 else 0.0


def residual(delta_rows: torch.Tensor, tau_rows: torch.Tensor | None, lam1: float) -> torch.Tensor:
    """``R = D[m] - lam1 * tau[m]`` (float32); the plain delta when there is no base vector."""
    return delta_rows if tau_rows is None else delta_rows - lam1 * tau_rows


def reconstruct(
    w_pre: torch.Tensor,
    rows: torch.Tensor,
    decoded: torch.Tensor,
    tau_rows: torch.Tensor | None,
    lam1: float,
    lam2: float,
) -> torch.Tensor:
    """``W' = W_pre`` with ``lam1*tau[m] + lam2*C(R)`` added on the changed rows ``m``.

    ``w_pre``: the reference matrix (any float dtype, 2-D); ``decoded``: float32
    ``(changed_rows, cols)``. Returns float32 ``(rows, cols)``, computed on w_pre's device.
    """
    out = w_pre.float().clone()
    update = lam2 * decoded
    if tau_rows is not None:
        update = update + lam1 * tau_rows
    out[rows] += update
    return out
