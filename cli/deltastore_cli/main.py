"""The ``deltastore`` command: a thin click layer over :class:`deltastore.Registry`.

Every user error is one line on stderr and a non-zero exit code (see EXIT_CODES), never a
traceback unless ``--debug``. Read commands take ``--json``; long work shows progress on
stderr when it is a terminal, never with ``--quiet``.

torch and transformers take seconds to import: commands that only read refs and records
(``--help``, ``ls``, ``log``, ``show``, ``base ls|show``) use :class:`deltastore.catalog.Catalog`
and never import them; the others import :class:`deltastore.Registry` when they run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from deltastore.catalog import Catalog, delta_settings, is_url, parse_spec
from deltastore.errors import (CorruptObjectError, DeltastoreError, FormatVersionError, LockTimeoutError,
                               NotFoundError, UnknownNameError)

if TYPE_CHECKING:
    from deltastore import Registry

EXIT_CODES = {NotFoundError: 3, CorruptObjectError: 4, FormatVersionError: 5, LockTimeoutError: 6}
EXIT_VERIFY_FAILED = 4
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells expect of a command stopped by Ctrl-C
DTYPES = ("float32", "float16", "bfloat16")


class Group(click.Group):
    """Turns deltastore errors into one line and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (DeltastoreError, OSError) as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            code = next((c for cls, c in EXIT_CODES.items() if isinstance(exc, cls)), 1)
            click.echo(f"error: {exc}", err=True)
            ctx.exit(code)
        except KeyboardInterrupt:
            # Writes are staged and published whole (docs/guarantees.md): nothing stored is
            # damaged, but staged leftovers stay until gc.
            registry = ctx.obj.get("registry") if ctx.obj else None
            click.echo(f"\ninterrupted: nothing stored changed half-way; `deltastore gc {registry or 'REGISTRY'}` "
                       "removes what the interrupted command left", err=True)
            ctx.exit(EXIT_INTERRUPTED)


def _emit(data: Any, as_json: bool, text: str) -> None:
    click.echo(json.dumps(data, indent=2, default=str) if as_json else text)


def _progress(ctx: click.Context) -> bool | None:
    return False if ctx.obj["quiet"] else None


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


def _times(ratio: float) -> str:
    """A ratio to 3 significant digits (0.0123x, 4.56x, 789x): one decimal shows 0.0x."""
    return f"{ratio:.3g}x"


def _catalog(path: Path) -> Catalog:
    """Open REGISTRY for reading: refs and records only, no torch."""
    _remember(path)
    return Catalog(path)


def _registry(path: Path, cache: Path | None = None) -> "Registry":
    """Open REGISTRY for work on tensors (imports torch); ``cache``: see ``cache_option``."""
    from deltastore.registry import Registry

    _remember(path)
    return Registry(path, cache=cache)


cache_option = click.option(
    "--cache", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Keep the arrays read from a registry on an object store in this local folder (default: "
         "$DELTASTORE_CACHE), so the next read of one, the reference above all, makes no request. Never stale "
         "(arrays are named by their content); not trimmed: delete it any time. Ignored for a local registry.")


def _remember(path: Path) -> None:
    # For the Ctrl-C message, which names the registry to gc.
    click.get_current_context().find_root().obj["registry"] = str(path)


def _torch_dtype(name: str | None):
    import torch

    return None if name is None else getattr(torch, name)


# A Hugging Face repo ID: ORG/NAME, as the hub spells them.
HF_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# What a model directory needs, no more: weights deltastore reads, configs and tokenizer files.
# (Pickle checkpoints, ONNX and other exports in the same repo are never downloaded.)
HF_PATTERNS = ["*.safetensors", "*.json", "*.txt", "*.model", "*.tiktoken"]


class ModelPath(click.ParamType):
    """A local model (directory or .safetensors file) or a Hugging Face repo ID (ORG/NAME),
    fetched through huggingface_hub's cache: downloaded once, offline with HF_HUB_OFFLINE=1."""

    name = "PATH|ORG/NAME"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Path:
        path = Path(value)
        if path.exists():
            return path
        if ".." in str(value) or not HF_REPO_ID.fullmatch(str(value)):
            self.fail(f"{value}: no such file or directory (nor a Hugging Face repo ID ORG/NAME)", param, ctx)
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        try:
            return Path(snapshot_download(str(value), allow_patterns=HF_PATTERNS))
        except (HfHubHTTPError, LocalEntryNotFoundError, ValueError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise NotFoundError(f"{value}: no such local path, and the Hugging Face repo {value!r} could not be "
                                f"fetched ({reason}); check the path or repo ID, or fill the cache first (with "
                                "HF_HUB_OFFLINE=1 only the cache is read)") from None


def _complete(kind: str):
    """Shell completion of task or base names from the REGISTRY argument typed before them."""

    def complete(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
        try:
            catalog = Catalog(ctx.params["registry"])
            names = catalog.tasks() if kind == "task" else catalog.bases()
        except (DeltastoreError, OSError, KeyError, TypeError):  # no registry (yet): nothing to offer
            return []
        return sorted(n for n in names if n.startswith(incomplete))

    return complete


json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")


class RegistryLocation(click.Path):
    """A registry folder (a Path), or an object-store URL such as ``s3://bucket/prefix``, kept
    as it is (a Path would fold its ``//``); the endpoint and credentials of a URL come from the
    environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID...), never from the command line."""

    name = "registry"

    def __init__(self):
        super().__init__(file_okay=False, path_type=Path)

    def convert(self, value, param, ctx):
        return value if is_url(value) else super().convert(value, param, ctx)


registry_arg = click.argument("registry", type=RegistryLocation())


@click.group(cls=Group)
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@click.version_option(package_name="deltastore")
@click.pass_context
def cli(ctx: click.Context, debug: bool, quiet: bool) -> None:
    """Store many finetunes of one pretrained model as tiny compressed deltas."""
    ctx.ensure_object(dict)
    ctx.obj.update(debug=debug, quiet=quiet)
    if not debug:
        _quiet_transformers()


def _quiet_transformers() -> None:
    """transformers' own bars ("Loading weights", "Writing model shards") and notices would
    interleave with ours on every load; the CLI shows its own progress and one-line errors."""

    # Read when transformers / huggingface_hub are imported (the shard-writing bar is the hub's).
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:  # already imported: tell it directly
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


@cli.command()
@registry_arg
@click.option("--reference", required=True, type=ModelPath(),
              help="Pretrained model: Hugging Face directory, .safetensors file or hub repo ID (ORG/NAME).")
@click.option("--compress-reference", is_flag=True,
              help="Store the reference's arrays with zstd: about 20% less disk for bf16 weights, but every "
                   "materialize without a resident reference decodes them (slower).")
@json_option
@click.pass_context
def init(ctx: click.Context, registry: Path, reference: Path, compress_reference: bool, as_json: bool) -> None:
    """Create REGISTRY holding the pretrained reference."""
    from deltastore.registry import Registry

    _remember(registry)
    reg = Registry.init(registry, reference, compress_reference=compress_reference, progress=_progress(ctx))
    ref = reg.reference()
    data = {"registry": str(registry), "reference": reg.reference_hash(), "tensors": len(ref.tensors),
            "files": sorted(ref.files), "bytes_on_disk": reg.backend.size("")}
    _emit(data, as_json, f"created {registry}: reference {data['reference'][:12]} with {data['tensors']} tensors, "
                         f"{_human(data['bytes_on_disk'])} on disk")


@cli.group()
def base() -> None:
    """DBMS base vectors."""


def _cluster_options(command):
    """--scheduler / --workers: where a command's work is fanned out (Dask)."""
    command = click.option("--workers", type=click.IntRange(min=1),
                           help="Start a local Dask cluster of this many worker processes (the first ones get a "
                                "GPU each, if any).")(command)
    return click.option("--scheduler", metavar="ADDRESS",
                        help="Join the Dask cluster whose scheduler is at ADDRESS (tcp://host:8786); its workers "
                             "must read the registry and the finetunes at the same paths.")(command)


@base.command("build")
@registry_arg
@click.option("--name", required=True, help="Name of the new base vector.")
@click.argument("finetunes", nargs=-1, required=True, type=ModelPath())
@click.option("--exclude", "exclude", multiple=True, metavar="PATTERN",
              help="Leave out the reference tensors whose name matches this shell pattern (repeatable), e.g. "
                   "'*embeddings*'; their tasks' deltas are compressed as without a base vector.")
@click.option("--min-params", type=click.IntRange(min=0), default=0, show_default=True,
              help="Leave out tensors with fewer elements than this.")
@click.option("--row-fraction", type=click.FloatRange(min=0, max=1, min_open=True), default=1.0, show_default=True,
              help="In each tensor keep only this share of the rows the finetunes changed, those where their mean "
                   "delta is largest (a sparse base: 1 bit per element of the rows kept).")
@_cluster_options
@json_option
@click.pass_context
def base_build(ctx: click.Context, registry: Path, name: str, finetunes: tuple[Path, ...], exclude: tuple[str, ...],
               min_params: int, row_fraction: float, scheduler: str | None, workers: int | None, as_json: bool) -> None:
    """Build tau_base = BitDelta(mean(W_t) - W_pre) from FINETUNES.

    The base costs 1 bit per element it covers, shared by the tasks that use it; --exclude,
    --min-params and --row-fraction make it cover less, for cohorts of few tasks.
    With --scheduler or --workers, each tensor's mean is computed on a Dask worker, with the
    same bits as in one process."""
    reg = _registry(registry)
    options = {"exclude": exclude, "min_params": min_params, "row_fraction": row_fraction}
    if scheduler is None and workers is None:
        record = reg.build_base(name, list(finetunes), **options, progress=_progress(ctx))
    else:
        from deltastore.engine.fanout import connect

        with connect(scheduler, workers) as client:
            record = reg.build_base(name, list(finetunes), **options, progress=_progress(ctx), client=client)
    data = _base_summary(reg, name)
    _emit(data, as_json, f"base {name}: {len(record.tensors)} tensors from {len(finetunes)} finetunes, "
                         f"{data['elements']:,} elements ({data['rows']:,} rows), "
                         f"{_human(data['bytes_on_disk'])} on disk")


def _base_summary(reg: Catalog, name: str) -> dict[str, Any]:
    digest, record = reg.base(name)
    size = reg.objects.size("records", digest) + sum(reg.objects.size("arrays", h) for h in record.array_hashes())
    # What the base pays a bit for: the rows of each entry's mask (all rows without one).
    rows = {r: e.shape[0] if e.changed_rows is None else e.changed_rows for r, e in record.tensors.items()}
    elements = sum(n * math.prod(record.tensors[r].shape[1:]) for r, n in rows.items())
    return {"name": name, "record": digest, "created": record.created, "reference": record.reference,
            "tensors": len(record.tensors), "rows": sum(rows.values()), "elements": elements,
            "sources": record.sources, "bytes_on_disk": size, "used_by": reg.base_users(name)}


@base.command("ls")
@registry_arg
@json_option
def base_ls(registry: Path, as_json: bool) -> None:
    """List base vectors: bytes on disk and the task versions built on each."""
    reg = _catalog(registry)
    data = [_base_summary(reg, name) for name in sorted(reg.bases())]
    rows = [["BASE", "TENSORS", "ON DISK", "FINETUNES", "USED BY"]] + [
        [b["name"], str(b["tensors"]), _human(b["bytes_on_disk"]), str(len(b["sources"])),
         ", ".join(b["used_by"]) or "-"] for b in data]
    _emit(data, as_json, _table(rows, right=frozenset({1, 2, 3})) if data else "(no base vectors)")


@base.command("show")
@registry_arg
@click.argument("name", shell_complete=_complete("base"))
@json_option
def base_show(registry: Path, name: str, as_json: bool) -> None:
    """Show one base vector: what it was built from and who uses it."""
    data = _base_summary(_catalog(registry), name)
    _emit(data, as_json, "\n".join([
        f"base {name}  {data['created']}  record {data['record'][:12]}",
        f"  tensors    {data['tensors']}, {data['elements']:,} elements in {data['rows']:,} rows, "
        f"{_human(data['bytes_on_disk'])} on disk",
        f"  built from {', '.join(data['sources'])}",
        f"  used by    {', '.join(data['used_by']) or 'no task version (`base rm` may remove it)'}",
    ]))


@base.command("rm")
@registry_arg
@click.argument("name", shell_complete=_complete("base"))
@json_option
def base_rm(registry: Path, name: str, as_json: bool) -> None:
    """Remove base vector NAME (refused while a task version uses it); `gc` then frees its bytes."""
    digest = _registry(registry).remove_base(name)
    _emit({"name": name, "record": digest}, as_json, f"removed base vector {name}; run gc to free space")


# Flags of earlier releases, each a field of one compressor's configuration: kept (hidden) so
# their scripts still run, as shorthands of --config FIELD=VALUE; new fields get no flag.
# Built-in tuners that fit on calibration inputs (--calib).
DATA_TUNERS = ("dbms", "fit-all")
CONFIG_SHORTHANDS = ("drop_rate", "value_bits", "group_size", "keep", "bits")


def _config_shorthands(command):
    for name in reversed(CONFIG_SHORTHANDS):
        command = click.option(f"--{name.replace('_', '-')}", name, metavar="VALUE", hidden=True,
                               help=f"Same as --config {name}=VALUE.")(command)
    return command


def _compressor_config(method: str | None, items: tuple[str, ...],
                       shorthands: dict[str, str | None]) -> tuple[str, dict[str, Any]]:
    """The compressor --method names (the default if none) and its configuration from --config
    KEY=VALUE and the shorthand flags, each value parsed by its field's type."""
    from deltastore.tensor.compressors import DEFAULT_COMPRESSOR, WHOLE_TENSORS, compressor_class, delta_compressors

    method = method or DEFAULT_COMPRESSOR
    # Looked up by name first: listing every compressor loads every plugin, and one broken
    # plugin should not stop commits that do not use it.
    try:
        config_class = compressor_class(method).config_class
    except UnknownNameError:
        config_class = None
    if config_class is None or method == WHOLE_TENSORS:
        raise click.BadParameter(f"{method!r} is not a compressor of deltas; known: {', '.join(delta_compressors())} "
                                 "(`deltastore compressors` describes them)", param_hint="--method")
    pairs = []  # (field, how the user spelled it, text)
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{item!r} is not KEY=VALUE (a field of the compressor and its value)",
                                     param_hint="--config")
        pairs.append((key.strip(), f"--config {key.strip()}", text))
    pairs += [(name, f"--{name.replace('_', '-')}", text) for name, text in shorthands.items() if text is not None]
    given: dict[str, tuple[str, str]] = {}
    for key, spelled, text in pairs:
        if key in given:
            raise click.UsageError(f"field {key} is given twice ({given[key][0]} and {spelled}); give it once")
        given[key] = (spelled, text)
    fields = [f.name for f in config_class.describe()]
    for key, (spelled, _) in given.items():
        if key not in fields:
            known = f"its --config fields are {', '.join(fields)}" if fields else "it has no --config fields"
            raise click.UsageError(f"{spelled} does not apply to --method {method}: {known}")
    return method, config_class.from_strings({key: text for key, (_, text) in given.items()}).to_dict()


@cli.command()
@registry_arg
@click.argument("task", shell_complete=_complete("task"))
@click.argument("finetune", type=ModelPath())
@click.option("--method", metavar="COMPRESSOR",
              help="Compressor of the deltas, by name: any registered one. `deltastore compressors` lists them, "
                   "the default and the fields --config sets.")
@click.option("--config", "config_items", metavar="KEY=VALUE", multiple=True,
              help="Set field KEY of the compressor's configuration to VALUE, parsed by the field's type "
                   "(repeatable; `none` for an optional field).")
@_config_shorthands
@click.option("--base", "base_name", help="Base vector to shift by (DBMS); without it: plain compression.")
@click.option("-m", "--message", default="", help="What this version is.")
@click.option("--tune", default=None,
              help="Tuner for lam1/lam2: l2 (closed form, the default), dbms (fit on --calib inputs), fit-all "
                   "(dbms, then the stored codes' own values: BitDelta's scales, DARE's kept values, DeltaDQ's "
                   "codes and scales, fitted to each layer's outputs on --calib) or a "
                   "registered name. dbms runs the model over the calibration inputs 5-25 times (--per-layer: "
                   "Adam, up to 100 forward+backward passes); measured on a 22.7M-parameter MiniLM with 200 "
                   "texts: 1.4-5 min on 2 busy CPU cores (benchmarks/results/tune_cost_cpu.md), 1-2 s for the "
                   "demo's models. fit-all took 2-6x as long as dbms on MiniLM with 64 texts "
                   "(170-500 s on 2 loaded CPU cores; benchmarks/results/quality.md).")
@click.option("--calib", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Calibration inputs for --tune dbms, one example per line (at least 32): a text file or JSONL "
                   "({\"text\": ...} or {\"input_ids\": [...]}), tokenized with FINETUNE's tokenizer.")
@click.option("--calib-max-length", type=click.IntRange(min=1), default=128, show_default=True,
              help="Truncate calibration examples to this many tokens.")
@click.option("--calib-batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Calibration examples per batch.")
@click.option("--tune-steps", type=click.IntRange(min=0), help="dbms, fit-all: most optimizer steps (default 100).")
@click.option("--tune-lr", type=click.FloatRange(min=0, min_open=True),
              help="dbms, fit-all: Adam learning rate (default 1e-2).")
@click.option("--max-gram-bytes", type=click.IntRange(min=0), metavar="N",
              help="fit-all: most bytes of layer-input Gram matrices (float64, in x in) held at once; the layers "
                   "are fitted in groups within N, each group after the first costing one more (shortened) pass "
                   "over the --calib inputs; 0: one layer at a time (default 268435456, 256 MiB). A byte budget "
                   "weighing outputs holds every Gram at once, or, over N, weighs the weights instead.")
@click.option("--per-layer", is_flag=True, help="One (lam1, lam2) per tensor instead of one pair per model.")
@click.option("--max-bytes", type=click.IntRange(min=1),
              help="Byte budget: per tensor, the compressor setting (among those each compressor offers for "
                   "budgets) of least reconstruction error that keeps the version's bytes on disk (side files, "
                   "whole tensors and record included) within N. With --method, only that compressor's settings.")
@click.option("--ratio", type=click.FloatRange(min=0, min_open=True),
              help="Byte budget as a ratio: the finetune's fp16 bytes / R (see --max-bytes).")
@click.option("--budget-proxy", type=click.Choice(["weights", "outputs"]), default="weights", show_default=True,
              help="How a byte budget measures a setting's error: weights (no data), outputs (each linear layer's "
                   "error on its --calib inputs; chose worse on the MiniLM zoo, benchmarks/results/budget_proxy.md).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the compressor's random choices (the masks of those that drop values).")
@click.option("--small-tensor-bits", type=click.IntRange(0, 52), metavar="N",
              help="Lossy small tensors (biases, norms): keep N mantissa bits of each value, the rest the "
                   "reference's (relative change < 2^-N); default: stored exactly. Measured in "
                   "benchmarks/results/quality.md.")
@click.option("--allow-unrelated", is_flag=True, help="Store a model even if it looks unrelated to the reference.")
@click.option("--follow-links", is_flag=True, help="Read files of FINETUNE that are symlinks leading out of it.")
@click.option("--device", default="cpu", show_default=True, help="Where to compute deltas and encode: cpu, cuda...")
@json_option
@click.pass_context
def commit(ctx: click.Context, registry: Path, task: str, finetune: Path, method: str | None, config_items,
           base_name, message, tune, calib, calib_max_length, calib_batch_size, tune_steps, tune_lr, max_gram_bytes,
           per_layer, max_bytes, ratio, budget_proxy, seed, small_tensor_bits, allow_unrelated, follow_links, device, as_json,
           **shorthands) -> None:
    """Compress FINETUNE as the next version of TASK."""
    if max_bytes is not None and ratio is not None:
        raise click.UsageError("give the byte budget once: --max-bytes or --ratio")
    budget_menu = None
    if (max_bytes is not None or ratio is not None) and (config_items or any(v is not None for v in shorthands.values())):
        raise click.UsageError("a byte budget picks each tensor's configuration: leave out --config (--method alone "
                               "restricts the choice to that compressor)")
    if (max_bytes is not None or ratio is not None) and method is not None:
        from deltastore.engine.budget import default_menu

        budget_menu = [(m, c) for m, c in default_menu() if m == method] or [(method, {})]
    method, config = _compressor_config(method, config_items, shorthands)
    tune_options = {k: v for k, v in (("max_steps", tune_steps), ("lr", tune_lr), ("max_gram_bytes", max_gram_bytes))
                    if v is not None}
    if tune in DATA_TUNERS and calib is None:
        raise click.UsageError(f"--tune {tune} fits on data: give --calib FILE (text, one example per line, "
                               "or JSONL)")
    budgeted = max_bytes is not None or ratio is not None
    if calib is not None and tune in (None, "l2") and not (budgeted and budget_proxy == "outputs"):
        raise click.UsageError("--calib is only read by a data-driven tuner or a byte budget weighing outputs; add "
                               "--tune dbms or --tune fit-all, or --budget-proxy outputs with --max-bytes/--ratio")
    if budget_proxy != "weights" and not budgeted:
        raise click.UsageError("--budget-proxy applies to a byte budget only: add --max-bytes or --ratio")
    if budget_proxy == "outputs" and calib is None:
        raise click.UsageError("--budget-proxy outputs weighs errors by the layers' inputs: give --calib FILE")
    weigh_outputs = budgeted and budget_proxy == "outputs"
    if max_gram_bytes is not None and tune != "fit-all" and not (weigh_outputs and tune in (None, "l2")):
        raise click.UsageError("--max-gram-bytes applies to --tune fit-all only (and to a byte budget given --calib)")
    if (tune_steps is not None or tune_lr is not None) and tune not in DATA_TUNERS:
        raise click.UsageError("--tune-steps and --tune-lr apply to --tune dbms and --tune fit-all only")
    reg = _registry(registry)
    calibration = None
    if calib is not None:
        from deltastore.calibration import MIN_EXAMPLES, example_count, load_calibration

        # The finetune's own tokenizer: a task's vocabulary may differ from the reference's.
        calibration = load_calibration(calib, finetune if finetune.is_dir() else None, max_length=calib_max_length,
                                       batch_size=calib_batch_size)
        examples = sum(example_count(b) for b in calibration)
        if not ctx.obj["quiet"]:
            click.echo(f"calibration: {examples} examples in {len(calibration)} batches from {calib}", err=True)
        if examples < MIN_EXAMPLES:
            click.echo(f"warning: only {examples} calibration examples in {calib}; lambdas fitted on so few follow "
                       f"them rather than the task: give at least {MIN_EXAMPLES}", err=True)
    latest = reg.version_hashes(task)[-1][0] if task in reg.tasks() else None
    record = reg.commit(task, finetune, method=method, config=config, base=base_name, message=message, tune=tune,
                        calibration=calibration, per_layer=per_layer, tune_options=tune_options or None, seed=seed,
                        small_tensor_bits=small_tensor_bits, allow_unrelated=allow_unrelated,
                        follow_links=follow_links, device=device, progress=_progress(ctx), skip_unchanged=True,
                        max_bytes=max_bytes, ratio=ratio, budget_menu=budget_menu, budget_proxy=budget_proxy)
    data = _version_summary(reg, record)
    if record.version == latest:
        _emit({**data, "committed": False}, as_json, f"nothing to commit: {task}@{latest} already holds {finetune} "
                                                     "with these settings")
        return
    data["committed"] = True
    fit = record.tuning or {}
    fitted = ""
    if "loss_initial" in fit:
        fitted = (f"; {fit.get('tuner')} fit: output MSE {fit['loss_initial']:.4g} -> {fit['loss_final']:.4g} in "
                  f"{fit.get('steps')} steps")
        if fit.get("fell_back"):
            fitted += " (no improvement: kept the closed form)"
    for rel, why in record.source.get("skipped_files", {}).items():  # the materialized folder will lack them
        click.echo(f"warning: {finetune}: file {rel!r} not stored: {why}", err=True)
    files = f" ({_human(data['file_bytes'])} of it side files)" if data["file_bytes"] else ""
    ratio = data["ratio_fp16"]
    versus = f"{_times(ratio)} smaller than fp16" if ratio >= 1 else f"{_times(1 / ratio)} larger than fp16"
    budget = f"\n  budget: {_budget_summary(data)}" if data["budget"] else ""
    _emit(data, as_json, f"{task}@{record.version}: {record.method}, lam1={record.lam1:.4g} lam2={record.lam2:.4g}, "
                         f"{_human(data['own_bytes'])} on disk{files}, {versus}{fitted}\n"
                         f"  rows: {_rows_summary(data)}{budget}")
    if data["delta_rows"] and data["unchanged_rows"] == data["delta_rows"]:
        click.echo(f"warning: {finetune} equals the reference in every compressed weight: nothing was finetuned "
                   "(the ratio above reflects that, not compression)", err=True)


@cli.command("commit-many")
@registry_arg
@click.argument("jobs", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_cluster_options
@json_option
@click.pass_context
def commit_many(ctx: click.Context, registry: Path, jobs: Path, scheduler: str | None, workers: int | None,
                as_json: bool) -> None:
    """Commit every finetune JOBS lists, fanned out on Dask workers (default: a local cluster).

    JOBS is a .jsonl file (one object a line) or a .csv file (a header row): fields task, path
    (relative to JOBS' folder), method, config (KEY=VALUE pairs separated by spaces), base,
    tune, calib, message; one job per task. The whole file is checked before any job runs. A
    job whose task already holds its finetune with its settings is skipped, so a rerun does
    only what is missing; a failed job publishes nothing and the others go on. Exit 1 if any
    job failed."""
    from deltastore.engine.fanout import connect, read_jobs

    job_list = read_jobs(jobs)
    reg = _registry(registry)
    echo = None if ctx.obj["quiet"] else (lambda line: click.echo(line, err=True))
    with connect(scheduler, workers) as client:
        summary = reg.commit_many(job_list, client, progress=_progress(ctx), echo=echo)
    failures = [f"  line {r['line']} {r['task']}: {r['error']}" for r in summary["results"] if r["status"] == "failed"]
    ratio = f", {_times(summary['ratio_fp16'])} smaller than fp16" if summary["ratio_fp16"] else ""
    _emit(summary, as_json, "\n".join([
        f"{summary['done']} committed, {summary['skipped']} skipped (nothing to commit), {summary['failed']} failed "
        f"of {summary['jobs']} jobs on {summary['workers']} worker{'s' if summary['workers'] != 1 else ''} in "
        f"{summary['seconds']:.1f} s",
        f"  {_human(summary['bytes_on_disk'])} on disk for {_human(summary['source_bytes'])} of finetunes{ratio}",
    ] + (["failed:"] + failures if failures else [])))
    if failures:
        ctx.exit(1)


def _tuning_summary(record) -> str:
    """The fit record in one line; `show --json` has all of it (loss curve, per-tensor pairs)."""
    tuning = record.tuning
    if not tuning:
        return "-"
    if tuning.get("tuner") == "l2":  # the default: nothing is fitted (specs/format.md §5.5)
        if record.base is None:
            return "none: no base vector, so lam1=0 and lam2=1"
        return "none: closed form lam1 = <delta, tau_base>/<tau_base, tau_base>, lam2=1" + (
            ", per tensor" if tuning.get("per_layer") else "")
    keys = ("tuner", "per_layer", "loss_initial", "loss_lambdas", "loss_final", "steps", "lr", "seed", "fell_back",
            "reason", "tensors_refit", "seconds")
    parts = [f"{k}={tuning[k]:.4g}" if isinstance(tuning[k], float) else f"{k}={tuning[k]}"
             for k in keys if tuning.get(k) is not None]
    calibration = tuning.get("calibration")
    if isinstance(calibration, dict) and calibration.get("sha256"):
        parts.append(f"calibration={calibration['sha256'][:12]} ({calibration.get('examples')} examples)")
    return ", ".join(parts)


def _row_counts(record) -> dict[str, int]:
    """Rows of the delta matrices, and how many the finetune left exactly as in the reference:
    those cost one mask bit each (specs/format.md §5.2), the others a compressed row."""
    deltas = [e for e in record.tensors.values() if e.is_delta]
    total = sum(e.shape[0] for e in deltas)
    changed = sum(e.shape[0] if e.rows is None else (e.changed_rows or 0) for e in deltas)
    return {"delta_rows": total, "unchanged_rows": total - changed}


def _rows_summary(data: dict[str, Any]) -> str:
    total, unchanged = data["delta_rows"], data["unchanged_rows"]
    if not total:
        return "no delta matrices"
    if not unchanged:
        return (f"all {total} rows of the delta matrices changed: each is compressed (a finetune that leaves rows "
                "untouched, such as embeddings of unseen tokens without weight decay, stores them as a bit)")
    return (f"{unchanged} of {total} rows of the delta matrices unchanged ({unchanged / total:.0%}): stored as one "
            "mask bit each, only the changed rows are compressed")


def _parts_summary(parts: dict[str, int]) -> str:
    """Where a version's own bytes go (specs/format.md §10), largest first."""
    total = sum(parts.values()) or 1
    return ", ".join(f"{name.replace('_', ' ')} {_human(size)} ({size / total:.0%})"
                     for name, size in sorted(parts.items(), key=lambda kv: -kv[1]))


def _version_summary(reg: Catalog, record) -> dict[str, Any]:
    stats = reg.stats(record.task, record.version).to_dict()
    base_name = None
    if record.base:
        base_name = next((b for b in reg.bases() if reg.base(b)[0] == record.base), None)
    return {
        "task": record.task, "version": record.version, "created": record.created, "message": record.message,
        "method": record.method, "config": record.config, "lam1": record.lam1, "lam2": record.lam2,
        "base": record.base, "base_name": base_name, "reference": record.reference, "parent": record.parent,
        "tuning": record.tuning, "tensors": len(record.tensors),
        "delta_tensors": sum(1 for e in record.tensors.values() if e.is_delta), "files": sorted(record.files),
        "packed_tensors": len(record.packed()),
        "small_tensor_bits": (record.source.get("settings") or {}).get("small_tensor_bits"),
        "settings": delta_settings(record), "budget": record.source.get("budget"),
        **_row_counts(record), **stats,
    }


def _budget_summary(data: dict[str, Any]) -> str:
    """A budgeted commit's choice in one line: the budget, then each setting's tensors and bytes."""
    budget = data["budget"]
    chosen = "; ".join(f"{label} x{row['tensors']} ({_human(row['bytes'])})" for label, row in budget["chosen"].items())
    return f"at most {budget['max_bytes']:,} bytes, holds {data['own_bytes']:,}: {chosen}"


@cli.command()
@registry_arg
@click.argument("spec", metavar="TASK[@VERSION]", shell_complete=_complete("task"))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Directory to write.")
@click.option("--device", default="cpu", show_default=True, help="Where to decode: cpu, cuda, cuda:1...")
@click.option("--dtype", type=click.Choice(DTYPES), help="Cast floating weights (default: the finetune's dtypes).")
@click.option("--no-verify", is_flag=True, help="Skip rehashing the arrays read (faster; trusts the disk).")
@cache_option
@json_option
@click.pass_context
def materialize(ctx, registry: Path, spec: str, out: Path, device: str, dtype, no_verify: bool, cache: Path | None,
                as_json) -> None:
    """Rebuild TASK's weights as a Hugging Face directory at --out."""
    task, version = parse_spec(spec)
    reg = _registry(registry, cache)
    path = reg.save_pretrained(task, out, version, device=device, dtype=_torch_dtype(dtype), verify=not no_verify,
                               progress=_progress(ctx))
    _, record = reg.version(task, version)
    data = {"task": task, "version": record.version, "out": str(path)}
    _emit(data, as_json, f"wrote {task}@{record.version} to {path}")


def _table(rows: list[list[str]], right: frozenset[int] = frozenset()) -> str:
    """Rows as aligned columns; columns in ``right`` (numbers) aligned right."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))] if rows else []
    return "\n".join("  ".join(cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in
                               enumerate(zip(row, widths))).rstrip() for row in rows)


def _ratio(source_fp16_bytes: int, own_bytes: int) -> float | None:
    return source_fp16_bytes / own_bytes if own_bytes else None


@cli.command("ls")
@registry_arg
@json_option
def ls(registry: Path, as_json: bool) -> None:
    """List tasks (latest version, its bytes on disk) and base vectors."""
    reg = _catalog(registry)
    tasks = []
    for task in sorted(reg.tasks()):
        versions = reg.version_hashes(task)
        _, record = reg.version(task)
        own = reg.own_bytes(task)
        tasks.append({"task": task, "latest": record.version, "versions": len(versions), "method": record.method,
                      "own_bytes": own, "ratio_fp16": _ratio(record.source["fp16_bytes"], own),
                      "created": record.created, "message": record.message})
    bases = sorted(reg.bases())
    data = {"registry": str(registry), "tasks": tasks, "bases": bases}
    rows = [["TASK", "VERSIONS", "COMPRESSOR", "ON DISK", "VS FP16", "CREATED", "MESSAGE"]] + [
        [f"{t['task']}@{t['latest']}", str(t["versions"]), t["method"], _human(t["own_bytes"]),
         f"{t['ratio_fp16']:.1f}x", t["created"], t["message"]] for t in tasks]
    text = _table(rows, right=frozenset({1, 3, 4})) if tasks else "(no tasks)"
    if bases:
        text += "\nbase vectors: " + ", ".join(bases)
    _emit(data, as_json, text)


@cli.command()
@registry_arg
@click.argument("spec", metavar="TASK[@VERSION]", shell_complete=_complete("task"))
@json_option
def show(registry: Path, spec: str, as_json: bool) -> None:
    """Show one task version: compressor and configuration, lambdas, base, bytes and ratios."""
    task, version = parse_spec(spec)
    reg = _catalog(registry)
    _, record = reg.version(task, version)
    data = _version_summary(reg, record)
    text = "\n".join([
        f"{task}@{record.version}  {record.created}  {record.message}",
        f"  compressor {record.method} {json.dumps(record.config)}",
        f"  lambdas    lam1={record.lam1:.6g}  lam2={record.lam2:.6g}",
        f"  base       {data['base_name'] or '-'} {(record.base or '')[:12]}",
        f"  tensors    {data['tensors']} ({data['delta_tensors']} as deltas, {data['packed_tensors']} packed"
        + (f"; small tensors lossy, {bits} mantissa bits kept)" if (bits := data["small_tensor_bits"]) is not None
           else ", exact)"),
        *(["  settings   " + "; ".join(f"{label} x{n}" for label, n in data["settings"].items())]
          if len(data["settings"]) > 1 else []),
        *([f"  budget     {_budget_summary(data)}"] if data["budget"] else []),
        f"  rows       {_rows_summary(data)}",
        f"  on disk    {_human(data['own_bytes'])} own ({_human(data['amortized_bytes'])} amortized over tasks "
        f"sharing objects) + {_human(data['base_share_bytes'])} base share",
        f"  own bytes  {_parts_summary(data['parts'])}",
        f"  ratio      {_times(data['ratio_fp16'])} vs fp16, {_times(data['ratio_source_dtype'])} vs the finetune's "
        f"dtype, {_times(data['ratio_fp16_with_base_share'])} vs fp16 with the base share, "
        f"{_times(data['ratio_fp16_amortized'])} amortized",
        f"  tuning     {_tuning_summary(record)}",
    ])
    _emit(data, as_json, text)


@cli.command()
@registry_arg
@click.argument("task", shell_complete=_complete("task"))
@json_option
def log(registry: Path, task: str, as_json: bool) -> None:
    """History of TASK, newest first, with each version's bytes on disk."""
    reg = _catalog(registry)
    data = []
    for record in reg.log(task):
        own = reg.own_bytes(task, record.version)
        data.append({"version": record.version, "created": record.created, "message": record.message,
                     "method": record.method, "lam1": record.lam1, "lam2": record.lam2, "parent": record.parent,
                     "own_bytes": own, "ratio_fp16": _ratio(record.source["fp16_bytes"], own)})
    rows = [[f"{task}@{v['version']}", v["created"], v["method"], _human(v["own_bytes"]), f"{v['ratio_fp16']:.1f}x",
             v["message"]] for v in data]
    _emit(data, as_json, _table(rows, right=frozenset({3, 4})))


@cli.command()
@registry_arg
@click.argument("spec_a", metavar="TASK@A", shell_complete=_complete("task"))
@click.argument("spec_b", metavar="TASK@B", shell_complete=_complete("task"))
@click.option("--top", type=click.IntRange(min=0), default=10, show_default=True,
              help="Tensors listed, largest relative error first (--json lists all).")
@cache_option
@json_option
@click.pass_context
def diff(ctx: click.Context, registry: Path, spec_a: str, spec_b: str, top: int, cache: Path | None,
         as_json: bool) -> None:
    """Compare two versions (of one task or two): compressor, lambdas, bytes on disk, and per tensor
    the relative error ||W_A - W_B|| / ||W_B|| of their materialized weights."""
    reg = _registry(registry, cache)
    sides = [_version_summary(reg, reg.version(spec)[1]) for spec in (spec_a, spec_b)]
    names = [f"{side['task']}@{side['version']}" for side in sides]
    # B is held whole, A streamed against it: one model in memory, not two.
    state_b = dict(reg.iter_materialize(names[1], progress=_progress(ctx)))
    errors: dict[str, float | None] = {}
    only_a = []
    for name, w_a in reg.iter_materialize(names[0], progress=_progress(ctx)):
        w_b = state_b.pop(name, None)
        if w_b is None:
            only_a.append(name)
        elif w_a.shape != w_b.shape:
            errors[name] = None  # a task-own head of another size: no element-wise difference
        else:
            diff_norm = float((w_a.double() - w_b.double()).norm())
            ref_norm = float(w_b.double().norm())
            errors[name] = diff_norm / ref_norm if ref_norm else (0.0 if diff_norm == 0 else float("inf"))
    ranked = sorted(errors.items(), key=lambda item: -1.0 if item[1] is None else item[1], reverse=True)
    comparable = [e for e in errors.values() if e is not None]
    data = {"a": sides[0], "b": sides[1], "relative_error": dict(ranked), "only_in_a": only_a,
            "only_in_b": sorted(state_b), "identical_tensors": sum(1 for e in comparable if e == 0),
            "max_relative_error": max(comparable, default=None)}
    rows = [["", names[0], names[1]],
            ["compressor", f"{sides[0]['method']} {json.dumps(sides[0]['config'])}",
             f"{sides[1]['method']} {json.dumps(sides[1]['config'])}"],
            ["lambdas", *(f"lam1={s['lam1']:.4g} lam2={s['lam2']:.4g}" for s in sides)],
            ["base", *(s["base_name"] or "-" for s in sides)],
            ["on disk", *(f"{_human(s['own_bytes'])} ({s['ratio_fp16']:.1f}x vs fp16)" for s in sides)],
            ["created", *(s["created"] for s in sides)]]
    lines = [_table(rows), "",
             f"relative error ||A - B|| / ||B||: {len(comparable)} tensors compared, {data['identical_tensors']} "
             f"identical, largest {data['max_relative_error'] or 0:.3g}"]
    lines += [f"  {'shapes differ' if error is None else format(error, '.3g'):>13}  {name}" for name, error in
              ranked[:top]]
    lines += [f"only in {names[0]}: {', '.join(only_a)}"] if only_a else []
    lines += [f"only in {names[1]}: {', '.join(sorted(state_b))}"] if state_b else []
    _emit(data, as_json, "\n".join(lines))


def _readable_versions(reg: Catalog, task: str) -> int:
    try:
        return len(reg.version_hashes(task))
    except DeltastoreError:  # a damaged ref: verify reports it, the count leaves it out
        return 0


@cli.command()
@registry_arg
@json_option
@click.pass_context
def verify(ctx: click.Context, registry: Path, as_json: bool) -> None:
    """Rehash every object and check every reference; exit 4 if anything is wrong."""
    reg = _registry(registry)
    stored = {kind: len(names) for kind, names in reg.objects.all_objects().items()}
    tasks = reg.tasks()
    versions = sum(_readable_versions(reg, t) for t in tasks)
    problems = reg.verify(progress=_progress(ctx))
    checked = (f"rehashed {stored.get('arrays', 0)} arrays, {stored.get('blobs', 0)} blobs and "
               f"{stored.get('records', 0)} records; checked the refs of {len(tasks)} task(s) ({versions} versions), "
               f"{len(reg.bases())} base vector(s) and the reference")
    # --json keeps its two keys (scripts compare it whole); the counts are for people.
    _emit({"ok": not problems, "problems": problems}, as_json,
          "\n".join([f"{p['object']}: {p['problem']} (used by {p['used_by']})" for p in problems]
                    + [f"{len(problems)} problem(s): {checked}" if problems else f"ok: {checked}"]))
    if problems:
        ctx.exit(EXIT_VERIFY_FAILED)


@cli.command()
@registry_arg
@click.option("--grace", type=float, default=None, metavar="SECONDS",
              help="keep what was written less than SECONDS ago (default: 0 on a folder, which gc locks; on "
                   "an object store $DELTASTORE_GC_GRACE or 3600, the period writers beside gc keep within, "
                   "which --grace may only lengthen)")
@json_option
def gc(registry: Path, grace: float | None, as_json: bool) -> None:
    """Delete objects no task, base or reference uses, and leftovers of killed commits."""
    removed = _registry(registry).gc(grace=grace)
    deferred = f"; {removed['deferred']} left for a next run (its lease ran out)" if removed["deferred"] else ""
    _emit(removed, as_json, f"removed {removed['arrays']} arrays, {removed['blobs']} blobs, {removed['records']} "
                            f"records, {removed['staging']} leftovers: {_human(removed['bytes'])}{deferred}")


@cli.command("copy")
@click.argument("src", type=RegistryLocation())
@click.argument("dst", type=RegistryLocation())
@click.argument("tasks", nargs=-1, metavar="[TASK]...")
@json_option
@click.pass_context
def copy_cmd(ctx: click.Context, src: Path, dst: Path, tasks: tuple[str, ...], as_json: bool) -> None:
    """Copy TASKs (default: all, with every base vector) from registry SRC to registry DST.

    Like `git push`: only the objects DST lacks are sent, each checked against its hash; refs
    are written last, so an interrupted copy changes no ref and running it again resumes it.
    Task refs only fast-forward. DST (a folder or a URL) is a registry of the same reference, or a
    new or empty location."""
    from deltastore.copy import copy

    _remember(dst)
    data = copy(src, dst, tasks or None, progress=_progress(ctx))
    copied, skipped = sum(data["copied"].values()), sum(data["skipped"].values())
    _emit(data, as_json, f"copied {copied} objects ({_human(data['bytes'])}), {skipped} already there; "
                         f"refs updated: {', '.join(data['refs']) or 'none'}")


def _interactive() -> bool:
    """Can we ask the user? (A function, so tests can pretend to be a terminal.)"""
    return sys.stdin.isatty()


@cli.command()
@registry_arg
@click.argument("spec", metavar="TASK[@VERSION]", shell_complete=_complete("task"))
@click.option("--all", "all_versions", is_flag=True, help="Remove every version of TASK (the whole task).")
@click.option("-y", "--yes", is_flag=True, help="With --all: do not ask, even on a terminal (for scripts).")
@json_option
def rm(registry: Path, spec: str, all_versions: bool, yes: bool, as_json: bool) -> None:
    """Remove a task version, or the whole task; `gc` then frees its bytes.

    A whole task (TASK without @) is removed after a yes at the terminal's prompt, or with
    --all (and --yes to skip the prompt on a terminal)."""
    task, version = parse_spec(spec)
    reg = _registry(registry)
    if version is None and "@" not in spec:  # TASK alone: every version (TASK@latest is one)
        count = len(reg.version_hashes(task))
        if _interactive() and not yes:
            if not click.confirm(f"remove all {count} version(s) of {task!r}?", err=True):
                raise click.Abort()
        elif not all_versions:
            raise click.UsageError(f"`rm {task}` removes all {count} version(s) of the task: add --all to confirm "
                                   f"(--all --yes on a terminal), or name one version as {task}@N")
    removed = reg.remove(spec)
    _emit({"task": task, "removed": removed}, as_json, f"removed {task} version(s) {removed}; run gc to free space")


@cli.command("compressors")
@json_option
def compressors(as_json: bool) -> None:
    """List the compressors `commit --method` takes and the fields --config sets.

    Built-in ones and those of the `deltastore.compressors` entry point group: what each
    stores, and each field's type, default and help. Loads them, so it imports torch."""
    from deltastore.tensor.compressors import DEFAULT_COMPRESSOR, available, compressor_class, delta_compressors

    usable = delta_compressors()
    data = []
    for name in available():
        cls = compressor_class(name)
        doc = sys.modules[cls.__module__].__doc__ or cls.__doc__ or ""
        data.append({"name": name, "default": name == DEFAULT_COMPRESSOR, "deltas": name in usable,
                     "summary": " ".join(doc.strip().split("\n\n")[0].split()),
                     "fields": [dataclasses.asdict(f) for f in cls.config_class.describe()]})
    lines = []
    for c in data:
        role = " (the default --method)" if c["default"] else "" if c["deltas"] else " (whole tensors, not a --method)"
        lines += [f"{c['name']}{role}", f"  {c['summary']}"]
        lines += [f"  {f['name']} ({f['type']}, default {f['default']}): {f['help']}" for f in c["fields"]]
        lines += [] if c["fields"] or not c["deltas"] else ["  no --config fields"]
    _emit(data, as_json, "\n".join(lines))


@cli.command()
@click.argument("workdir", type=click.Path(file_okay=False, path_type=Path))
@json_option
@click.pass_context
def demo(ctx: click.Context, workdir: Path, as_json: bool) -> None:
    """Build a tiny BERT and three finetunes in WORKDIR, then run the whole pipeline on them."""
    from deltastore.demo import run_demo

    report = run_demo(workdir, progress=_progress(ctx), echo=None if as_json else click.echo)
    if as_json:
        click.echo(json.dumps(report, indent=2))


def main() -> None:  # pragma: no cover - console entry
    cli(obj={})


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
