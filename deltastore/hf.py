"""transformers integration: a task as a ready model, no throwaway random initialisation."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import InvalidInputError

if TYPE_CHECKING:
    from .registry import Registry


def load_model(registry: "Registry", task: str, version: int | None = None, *,
               device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Build the model class named in the stored config.json's ``architectures`` and load the
    materialized weights into it.

    ``from_pretrained(None, config=..., state_dict=...)`` creates the module on the meta
    device and assigns our tensors, re-tying shared weights and creating non-persistent
    buffers itself, so no full-precision random model is ever built.
    """
    import transformers

    _, record = registry.version(task, version)
    if "config.json" not in record.files:
        raise InvalidInputError(
            f"task {task!r} version {record.version} has no config.json: it was committed from a bare "
            "state dict or .safetensors file; use materialize() for its state dict"
        )
    config_bytes = registry.objects.get_blob(record.files["config.json"])
    config_dict = json.loads(config_bytes)
    architectures = config_dict.get("architectures") or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    if cls is None:
        raise InvalidInputError(
            f"task {task!r}: config.json names architectures {architectures}, none of which this transformers "
            f"version ({transformers.__version__}) provides"
        )
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_bytes(config_bytes)
        config = transformers.AutoConfig.from_pretrained(tmp)
    state = registry.materialize(task, version, device=device, dtype=dtype)
    model = cls.from_pretrained(None, config=config, state_dict=state, dtype=dtype or "auto")
    return model.to(device).eval()
