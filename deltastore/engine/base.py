"""A base vector, one reference tensor at a time: ``tau_base[r] = BitDelta(mean_t(W_t[r] - W_pre[r]))``.

:func:`base_entry` is the only code that computes a base vector's tensor, in the summation
order that is normative (specs/format.md §6): in float32, a running sum starting at zero to
which each finetune's delta is added in the order the finetunes were given, then divided by
their count. The single-process build (:meth:`deltastore.Registry.build_base`) calls it for
each tensor in turn; the distributed build (:mod:`deltastore.engine.fanout`) calls it on
workers, one tensor per task; so both give the same bits. It holds three tensors at a time
(the reference's, the running sum, one finetune's), whatever the number of finetunes.

:class:`BaseOptions` makes a cheaper base vector (issue 16): fewer tensors (``exclude``
patterns, ``min_params``) or, in each tensor, only the rows of largest mean delta
(``row_fraction``). Readers need nothing new: a task tensor whose reference tensor has no base
entry decodes with ``T = 0``, and a base entry's rows outside its mask are 0 (specs/format.md
§6), so a partial base is an ordinary base record.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Iterable

import torch

from ..errors import InvalidInputError
from ..sources import TensorSource
from ..storage.objects import ObjectStore
from ..storage.records import ReferenceRecord, TensorEntry
from ..tensor import dbms
from .commit import Plan, check_finite, store_code
from .decode import decode_stored


@dataclass(frozen=True)
class BaseOptions:
    """What a base vector covers; the defaults cover every delta tensor and every changed row.

    ``exclude``: shell patterns (``fnmatch``, case-sensitive) of reference tensor names left
    out (``"*embeddings*"``: BERT's embedding matrices); ``min_params``: tensors with fewer
    elements are left out; ``row_fraction``: in each tensor, only this share of the rows where
    the mean delta is non-zero, those of largest energy. A tensor left out costs no bit and its
    tasks' residual is their whole delta, as without a base vector."""

    exclude: tuple[str, ...] = ()
    min_params: int = 0
    row_fraction: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.exclude, str) or not all(isinstance(p, str) and p for p in self.exclude):
            raise InvalidInputError(f"base option exclude: expected a list of non-empty name patterns (e.g. "
                                    f"['*embeddings*']), found {self.exclude!r}; give each pattern as one item")
        if isinstance(self.min_params, bool) or not isinstance(self.min_params, int) or self.min_params < 0:
            raise InvalidInputError(f"base option min_params: expected a whole number >= 0 (tensors with fewer "
                                    f"elements get no base entry), found {self.min_params!r}")
        fraction = self.row_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1 \
                or math.isnan(fraction):
            raise InvalidInputError(f"base option row_fraction: expected a number in (0, 1], the share of each "
                                    f"tensor's changed rows the base keeps (1: all), found {fraction!r}")


def select_base_tensors(reference: ReferenceRecord, candidates: Iterable[str], options: BaseOptions,
                        name: str) -> list[str]:
    """The reference tensors among ``candidates`` (those every finetune stores as a delta) that
    base vector ``name`` covers under ``options``; refuses a pattern that matches none of the
    candidates (a typo would silently build a full base) and options that leave nothing."""
    candidates = list(candidates)
    for pattern in options.exclude:
        if not any(fnmatch.fnmatchcase(r, pattern) for r in candidates):
            shown = ", ".join(candidates[:3]) + (", ..." if len(candidates) > 3 else "")
            raise InvalidInputError(f"base {name!r}: exclude pattern {pattern!r} matches none of the "
                                    f"{len(candidates)} tensors a base vector would cover ({shown}); fix the "
                                    "pattern (it is matched against whole reference tensor names)")
    chosen = [r for r in candidates if not any(fnmatch.fnmatchcase(r, p) for p in options.exclude)
              and math.prod(reference.tensors[r].shape) >= options.min_params]
    if candidates and not chosen:
        largest = max(candidates, key=lambda r: math.prod(reference.tensors[r].shape))
        raise InvalidInputError(f"base {name!r}: exclude={list(options.exclude)} and min_params={options.min_params} "
                                f"leave none of the {len(candidates)} tensors a base vector would cover (the largest, "
                                f"{largest}, has {math.prod(reference.tensors[largest].shape):,} elements); loosen "
                                "them, or commit without a base vector")
    return chosen


def check_base_inputs(sources: list[TensorSource], plans: list[Plan], ref_name: str) -> None:
    """Refuse NaN or infinities in any finetune's tensor for ``ref_name`` (run over every
    tensor before the first write, so a refused build writes nothing)."""
    for source, plan in zip(sources, plans):
        name = plan.lossy_ref[ref_name]
        check_finite(source, name, source.get(name))


def base_entry(objects: ObjectStore, reference: ReferenceRecord, sources: list[TensorSource], plans: list[Plan],
               ref_name: str, txn: str, row_fraction: float = 1.0) -> TensorEntry:
    """Compute and stage (in ``txn``) the base vector's entry for reference tensor ``ref_name``
    (on ``row_fraction`` of its changed rows, :class:`BaseOptions`)."""
    w_pre = decode_stored(reference.tensors[ref_name], lambda digest, what: objects.get_array(digest, what=what),
                          "cpu").float()
    mean = torch.zeros_like(w_pre)
    for source, plan in zip(sources, plans):
        name = plan.lossy_ref[ref_name]
        tensor = source.get(name)
        check_finite(source, name, tensor)
        mean += tensor.float() - w_pre
    mean /= len(sources)
    code = dbms.build_base(dbms.as_matrix(mean), row_fraction)
    return store_code(objects, code, dbms.BASE_COMPRESSOR, {}, w_pre.shape, "float32", ref_name, txn)
