"""A base vector, one reference tensor at a time: ``tau_base[r] = BitDelta(mean_t(W_t[r] - W_pre[r]))``.

:func:`base_entry` is the only code that computes a base vector's tensor, in the summation
order that is normative (specs/format.md §6): in float32, a running sum starting at zero to
which each finetune's delta is added in the order the finetunes were given, then divided by
their count. The single-process build (:meth:`deltastore.Registry.build_base`) calls it for
each tensor in turn; the distributed build (:mod:`deltastore.engine.fanout`) calls it on
workers, one tensor per task; so both give the same bits. It holds three tensors at a time
(the reference's, the running sum, one finetune's), whatever the number of finetunes.
"""

from __future__ import annotations

import torch

from ..sources import TensorSource
from ..storage.objects import ObjectStore
from ..storage.records import ReferenceRecord, TensorEntry
from ..tensor import dbms
from .commit import Plan, check_finite, store_code
from .decode import decode_stored


def check_base_inputs(sources: list[TensorSource], plans: list[Plan], ref_name: str) -> None:
    """Refuse NaN or infinities in any finetune's tensor for ``ref_name`` (run over every
    tensor before the first write, so a refused build writes nothing)."""
    for source, plan in zip(sources, plans):
        name = plan.lossy_ref[ref_name]
        check_finite(source, name, source.get(name))


def base_entry(objects: ObjectStore, reference: ReferenceRecord, sources: list[TensorSource], plans: list[Plan],
               ref_name: str, txn: str) -> TensorEntry:
    """Compute and stage (in ``txn``) the base vector's entry for reference tensor ``ref_name``."""
    w_pre = decode_stored(reference.tensors[ref_name], lambda digest, what: objects.get_array(digest, what=what),
                          "cpu").float()
    mean = torch.zeros_like(w_pre)
    for source, plan in zip(sources, plans):
        name = plan.lossy_ref[ref_name]
        tensor = source.get(name)
        check_finite(source, name, tensor)
        mean += tensor.float() - w_pre
    mean /= len(sources)
    code = dbms.build_base(dbms.as_matrix(mean))
    return store_code(objects, code, dbms.BASE_COMPRESSOR, {}, w_pre.shape, "float32", ref_name, txn)
