"""The compressor protocol: what every delta compressor provides.

A compressor maps a 2-D float32 matrix ``x`` of shape ``(rows, cols)`` (a delta or a DBMS
residual; tensors of more dimensions are flattened to ``(shape[0], prod(shape[1:]))`` by the
caller, and rows that the finetune left unchanged are removed by the caller before) to an
:class:`Encoded`: a few named integer/float arrays plus a few scalars. ``decode`` gives the
lossy reconstruction back as float32 ``(rows, cols)`` on the requested device.

Optional members: ``fused_decoder()`` (a single-pass GPU decoder); ``refit(encoded, target,
gram)``, the same code with its continuous part (scales, kept values) fitted to ``target``
under an input Gram matrix (deltastore.tensor.lsq; the ``fit-all`` tuner); ``budget_settings``,
the configurations a byte-budgeted commit may choose among (deltastore.engine.budget).

The ``lossless`` compressor is the one exception to the float32 2-D contract: it reproduces any
tensor bit for bit, in its own dtype and shape.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Protocol, runtime_checkable

import torch

from ...dtypes import array_torch_dtypes
from ...errors import CorruptObjectError, InvalidInputError

# Array dtypes a compressor may emit, from the package's one dtype table (deltastore/dtypes.py):
# the storage layer maps them 1:1 to zarr data types.
ARRAY_DTYPES = array_torch_dtypes()


def required_array(arrays: dict, role: str):
    """``arrays[role]``; a code without it is corrupt (a crafted or damaged record)."""
    if role not in arrays:
        raise CorruptObjectError(f"the stored code has no array {role!r} (it has {sorted(arrays)})")
    return arrays[role]


def required_attr(attrs: dict, name: str, kind: type) -> Any:
    """``attrs[name]``, which must be of ``kind`` (a float may be written as an int; a bool is
    no number)."""
    value = attrs.get(name)
    if not isinstance(value, (int, float) if kind is float else kind) or isinstance(value, bool):
        raise CorruptObjectError(f"the stored code's attribute {name!r} must be {kind.__name__}, found {value!r:.40}")
    return value


@dataclass(frozen=True)
class Encoded:
    """A compressed matrix.

    ``arrays``: role name -> 1-D or n-D tensor with a dtype from ``ARRAY_DTYPES``, stored as
    one zarr array each. ``attrs``: role name -> int, float, str, bool or list of them,
    stored in the version record (msgpack). Roles are fixed per compressor (its spec page).
    """

    arrays: dict[str, torch.Tensor]
    attrs: dict[str, Any] = field(default_factory=dict)

    def array(self, role: str) -> torch.Tensor:
        return required_array(self.arrays, role)

    def attr(self, name: str, kind: type) -> Any:
        return required_attr(self.attrs, name, kind)

    def to(self, device: torch.device | str) -> "Encoded":
        return Encoded({k: v.to(device) for k, v in self.arrays.items()}, dict(self.attrs))

    def nbytes(self) -> int:
        """Bytes of the arrays before any storage codec."""
        return sum(a.numel() * a.element_size() for a in self.arrays.values())


@dataclass(frozen=True)
class ConfigField:
    """One field of a compressor's configuration, as a CLI or a form presents it."""

    name: str
    type: str       # the annotation as written: "float", "int", "int | None"
    default: Any
    help: str


class CompressorConfig:
    """Mixin for the frozen dataclass configs: strict round trip to the metadata dict, and a
    help text per field (``dataclasses.field(metadata={"help": ...})``)."""

    @classmethod
    def describe(cls) -> list[ConfigField]:
        # Every field has a default (a stored configuration may leave any out, format §1), given
        # as a value or, for a mutable one, by a factory.
        defaults = cls()  # type: ignore[call-arg]
        return [ConfigField(f.name, _type_name(f.type), getattr(defaults, f.name), f.metadata.get("help", ""))
                for f in dataclasses.fields(cls)]  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidInputError(
                f"{cls.__name__}: unknown configuration field(s) {unknown}; known fields are {sorted(known)}"
            )
        return cls(**data)

    @classmethod
    def from_strings(cls, values: Mapping[str, str]):
        """The configuration from ``field -> text`` (a command line's ``key=value``): each
        text is parsed by its field's annotation (``int``, ``float``, ``bool``, ``str``, any
        of them ``| None`` with ``none`` for None; other types as JSON), then checked as
        :meth:`from_dict` checks a stored one."""
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        parsed = {key: _parse_text(cls.__name__, key, hints[key], text) if key in known else text
                  for key, text in values.items()}
        return cls.from_dict(parsed)


def _type_name(annotation: Any) -> str:
    """An annotation as written: a string under ``from __future__ import annotations``, else a
    class (``int``) or a union (``int | None``) that a third-party module evaluated."""
    if isinstance(annotation, str):
        return annotation
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


_TRUE, _FALSE = ("true", "yes", "1"), ("false", "no", "0")


def _parse_text(owner: str, key: str, hint: Any, text: str) -> Any:
    """``text`` as a value of type ``hint`` (see :meth:`CompressorConfig.from_strings`)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        if text.strip().lower() in ("none", "null"):
            return None
        rest = [a for a in args if a is not type(None)]
        hint = rest[0] if len(rest) == 1 else Any
    try:
        if hint is bool:
            if text.strip().lower() not in _TRUE + _FALSE:
                raise ValueError(text)
            return text.strip().lower() in _TRUE
        if hint in (int, float, str):
            return hint(text)
        return json.loads(text)
    except ValueError:
        raise InvalidInputError(f"{owner}.{key}: {text!r} is not of type {_type_name(hint)}; give {key}=VALUE "
                                "with a value of that type") from None


@runtime_checkable
class Compressor(Protocol):
    """One delta compressor, configured at construction and stateless afterwards."""

    name: ClassVar[str]
    config_class: ClassVar[type]
    config: Any

    def encode(self, x: torch.Tensor, *, seed: int) -> Encoded:
        """Compress ``x`` (float32, ``(rows, cols)``, any device). ``seed`` is a uint32 that
        fixes every random choice; it is stored in ``attrs`` when the decoder needs it."""
        ...

    def decode(self, encoded: Encoded, shape: tuple[int, int], device: torch.device | str) -> torch.Tensor:
        """Reconstruct float32 ``shape`` on ``device`` from ``encoded`` (arrays on any device)."""
        ...

    def simulate(self, x: torch.Tensor, *, seed: int) -> torch.Tensor:
        """``decode(encode(x))`` written with autograd-friendly ops, for lambda tuning.

        Gradients flow where the compressor is differentiable in ``x``: linear for a fixed
        DARE/DeltaDQ mask, through the BitDelta scale; quantization rounding is passed
        straight through. Values equal ``decode(encode(x))`` up to float rounding.
        """
        ...
