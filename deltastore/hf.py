"""transformers integration: a task as a ready model, no throwaway random initialisation.

How the model is built (transformers 5): ``cls.from_pretrained(None, config=..., state_dict=...)``
creates the module under ``torch.device("meta")`` (no memory, no random numbers), assigns our
tensors to it, re-ties shared weights (GPT-2's ``lm_head``, T5's embeddings: the checkpoint
holds one copy, so does the registry) and computes the non-persistent buffers
(``position_ids``, rotary ``inv_freq``) in ``initialize_weights``. Every loaded tensor is
flagged ``_is_hf_initialized``, so transformers' guarded init functions skip it: no weight is
ever drawn at random (tests/test_hf.py checks this by counting the init calls that touch a
real tensor).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch

from .errors import InvalidInputError

if TYPE_CHECKING:
    from .registry import Registry


def model_class(config: Mapping[str, Any], what: str):
    """The ``transformers`` class named first in a config.json's ``architectures``."""
    import transformers

    architectures = config.get("architectures") or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise InvalidInputError(
            f"{what}: config.json names architectures {architectures}, none of which this transformers "
            f"version ({transformers.__version__}) provides"
        )
    return cls


def build_model(config_json: bytes, state: Mapping[str, torch.Tensor], *, what: str,
                dtype: torch.dtype | None = None):
    """A model of the class named in ``config_json`` holding exactly the tensors of ``state``.

    ``state``: the checkpoint's tensors by name (any device; tied copies may be absent, they
    are re-tied). ``dtype``: the parameters' dtype (None: the first floating dtype of ``state``,
    which for a checkpoint saved by transformers is every parameter's). The model
    is in eval mode, on the device of ``state``'s tensors (non-persistent buffers are moved
    there too).
    """
    import transformers

    cls = model_class(json.loads(config_json), what)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_bytes(config_json)
        config = transformers.AutoConfig.from_pretrained(tmp)
    if dtype is None:
        # The checkpoint's own dtype; "auto" would trust config.json's ``dtype`` field instead,
        # which need not match the tensors (a model cast to bf16 after its config was written).
        dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    devices = {t.device for t in state.values()}
    # With the tensors' own device as device_map, transformers assigns them as they are; without
    # it, it builds the model on the CPU, copying every tensor there and back (measured on the
    # H200: 0 of 147 tensors kept, 4.3 s of copies for a 3 GB model).
    device_map = str(next(iter(devices))) if len(devices) == 1 else None
    model = cls.from_pretrained(None, config=config, state_dict=dict(state), dtype=dtype, device_map=device_map)
    return model.eval()


def checkpoint_names(model: torch.nn.Module) -> dict[str, str]:
    """Checkpoint name -> the model's own parameter or buffer name.

    transformers 5 renames some checkpoint keys on load and back on save (ViT's
    ``encoder.layer.0.attention.attention.query`` is ``layers.0.attention.q_proj`` in the
    module), so the names the registry stores are not always the module's. Renamed tensors
    are mapped (found by identity through ``revert_weight_conversion``, the mapping
    save_pretrained applies); tensors that transformers converts (fuses, splits, permutes) on
    load have no single module tensor and are absent from the answer.
    """
    tensors = model.state_dict(keep_vars=True)  # tied aliases included, each the same object
    mapping = {name: name for name in tensors}
    try:
        from transformers import PreTrainedModel
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # an older transformers: checkpoint names are the module's
        return mapping
    if not isinstance(model, PreTrainedModel):
        return mapping
    by_id = {id(t): name for name, t in tensors.items()}
    for checkpoint_name, tensor in revert_weight_conversion(model, dict(tensors)).items():
        if id(tensor) in by_id:
            mapping[checkpoint_name] = by_id[id(tensor)]
    return mapping


def load_model(registry: "Registry", task: str, version: int | None = None, *,
               device: str | torch.device = "cpu", dtype: torch.dtype | None = None, verify: bool = True):
    """Build the model class named in the stored config.json's ``architectures`` and load the
    materialized weights into it (on ``device``, in ``dtype`` or each tensor's stored dtype).
    """
    _, record = registry.version(task, version)
    if "config.json" not in record.files:
        raise InvalidInputError(
            f"task {task!r} version {record.version} has no config.json: it was committed from a bare "
            "state dict or .safetensors file; use materialize() for its state dict"
        )
    config_bytes = registry.objects.get_blob(record.files["config.json"])
    model_class(json.loads(config_bytes), f"task {task!r}")  # fail before decoding anything
    state = registry.materialize(task, version, device=device, dtype=dtype, verify=verify)
    return build_model(config_bytes, state, what=f"task {task!r}", dtype=dtype).to(device)
