"""The ``deltastore`` command: a thin click layer over :class:`deltastore.Registry`.

Every user error is one line on stderr and a non-zero exit code (see EXIT_CODES), never a
traceback unless ``--debug``. Read commands take ``--json``; long work shows progress on
stderr when it is a terminal, never with ``--quiet``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from deltastore import (CorruptObjectError, DeltastoreError, FormatVersionError, LockTimeoutError, NotFoundError,
                        Registry, parse_spec)

EXIT_CODES = {NotFoundError: 3, CorruptObjectError: 4, FormatVersionError: 5, LockTimeoutError: 6}
EXIT_VERIFY_FAILED = 4
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


def _torch_dtype(name: str | None):
    import torch

    return None if name is None else getattr(torch, name)


json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
registry_arg = click.argument("registry", type=click.Path(file_okay=False, path_type=Path))


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
@click.option("--reference", required=True, type=click.Path(exists=True, path_type=Path),
              help="Pretrained model: Hugging Face directory or .safetensors file.")
@click.option("--compress-reference", is_flag=True,
              help="Store the reference's arrays with zstd: about 20% less disk for bf16 weights, but every "
                   "materialize without a resident reference decodes them (slower).")
@json_option
@click.pass_context
def init(ctx: click.Context, registry: Path, reference: Path, compress_reference: bool, as_json: bool) -> None:
    """Create REGISTRY holding the pretrained reference."""
    reg = Registry.init(registry, reference, compress_reference=compress_reference, progress=_progress(ctx))
    ref = reg.reference()
    data = {"registry": str(registry), "reference": reg.reference_hash(), "tensors": len(ref.tensors),
            "files": sorted(ref.files), "bytes_on_disk": reg.backend.size("")}
    _emit(data, as_json, f"created {registry}: reference {data['reference'][:12]} with {data['tensors']} tensors, "
                         f"{_human(data['bytes_on_disk'])} on disk")


@cli.group()
def base() -> None:
    """DBMS base vectors."""


@base.command("build")
@registry_arg
@click.option("--name", required=True, help="Name of the new base vector.")
@click.argument("finetunes", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@json_option
@click.pass_context
def base_build(ctx: click.Context, registry: Path, name: str, finetunes: tuple[Path, ...], as_json: bool) -> None:
    """Build tau_base = BitDelta(mean(W_t) - W_pre) from FINETUNES."""
    reg = Registry(registry)
    record = reg.build_base(name, list(finetunes), progress=_progress(ctx))
    digest, _ = reg.base(name)
    size = reg.objects.size("records", digest) + sum(reg.objects.size("arrays", h) for h in record.array_hashes())
    data = {"name": name, "record": digest, "tensors": len(record.tensors), "sources": record.sources,
            "bytes_on_disk": size}
    _emit(data, as_json, f"base {name}: {len(record.tensors)} tensors from {len(finetunes)} finetunes, "
                         f"{_human(size)} on disk")


@cli.command()
@registry_arg
@click.argument("task")
@click.argument("finetune", type=click.Path(exists=True, path_type=Path))
@click.option("--method", type=click.Choice(["bitdelta", "dare", "deltadq"]), default="bitdelta", show_default=True)
@click.option("--drop-rate", type=float, help="DARE: fraction of delta values dropped (default 0.99).")
@click.option("--value-bits", type=click.Choice(["16", "8"]), help="DARE: bits per kept value (default 16).")
@click.option("--mask-layout", type=click.Choice(["gaps", "hash"]),
              help="DARE: how the mask is regenerated: gaps (default; decodes in time proportional to the kept "
                   "values) or hash (format 1.0, which older readers read).")
@click.option("--group-size", type=int, help="DeltaDQ: group size g (default 16).")
@click.option("--keep", type=int, help="DeltaDQ: values kept per group k (default 2).")
@click.option("--bits", type=int, help="DeltaDQ: quantization bits b (default 4).")
@click.option("--base", "base_name", help="Base vector to shift by (DBMS); without it: plain compression.")
@click.option("-m", "--message", default="", help="What this version is.")
@click.option("--tune", default=None,
              help="Tuner for lam1/lam2: l2 (closed form, the default), dbms (fit on --calib inputs) or a "
                   "registered name.")
@click.option("--calib", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Calibration inputs for --tune dbms: a text file (one example per line) or JSONL "
                   "({\"text\": ...} or {\"input_ids\": [...]}), tokenized with FINETUNE's tokenizer.")
@click.option("--calib-max-length", type=click.IntRange(min=1), default=128, show_default=True,
              help="Truncate calibration examples to this many tokens.")
@click.option("--calib-batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Calibration examples per batch.")
@click.option("--tune-steps", type=click.IntRange(min=0), help="dbms: most optimizer steps (default 100).")
@click.option("--tune-lr", type=click.FloatRange(min=0, min_open=True), help="dbms: Adam learning rate (default 1e-2).")
@click.option("--per-layer", is_flag=True, help="One (lam1, lam2) per tensor instead of one pair per model.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the DARE/DeltaDQ masks.")
@click.option("--allow-unrelated", is_flag=True, help="Store a model even if it looks unrelated to the reference.")
@click.option("--device", default="cpu", show_default=True, help="Where to compute deltas and encode: cpu, cuda...")
@json_option
@click.pass_context
def commit(ctx: click.Context, registry: Path, task: str, finetune: Path, method: str, drop_rate, value_bits,
           mask_layout, group_size, keep, bits, base_name, message, tune, calib, calib_max_length, calib_batch_size, tune_steps,
           tune_lr, per_layer, seed, allow_unrelated, device, as_json) -> None:
    """Compress FINETUNE as the next version of TASK."""
    options = {"drop_rate": drop_rate, "value_bits": None if value_bits is None else int(value_bits),
               "layout": mask_layout, "group_size": group_size, "keep": keep, "bits": bits}
    allowed = {"bitdelta": (), "dare": ("drop_rate", "value_bits", "layout"), "deltadq": ("group_size", "keep", "bits")}
    stray = [k for k, v in options.items() if v is not None and k not in allowed[method]]
    if stray:
        flag = "mask-layout" if stray[0] == "layout" else stray[0].replace("_", "-")
        raise click.UsageError(f"--{flag} does not apply to --method {method}")
    config = {k: v for k, v in options.items() if v is not None}
    tune_options = {k: v for k, v in (("max_steps", tune_steps), ("lr", tune_lr)) if v is not None}
    if tune == "dbms" and calib is None:
        raise click.UsageError("--tune dbms fits lam1/lam2 on data: give --calib FILE (text, one example per line, "
                               "or JSONL)")
    if calib is not None and tune in (None, "l2"):
        raise click.UsageError("--calib is only read by a data-driven tuner; add --tune dbms")
    if tune_options and tune != "dbms":
        raise click.UsageError("--tune-steps and --tune-lr apply to --tune dbms only")
    reg = Registry(registry)
    calibration = None
    if calib is not None:
        from deltastore.calibration import load_calibration

        # The finetune's own tokenizer: a task's vocabulary may differ from the reference's.
        calibration = load_calibration(calib, finetune if finetune.is_dir() else None, max_length=calib_max_length,
                                       batch_size=calib_batch_size)
    record = reg.commit(task, finetune, method=method, config=config, base=base_name, message=message, tune=tune,
                        calibration=calibration, per_layer=per_layer, tune_options=tune_options or None, seed=seed,
                        allow_unrelated=allow_unrelated, device=device, progress=_progress(ctx))
    data = _version_summary(reg, record)
    fit = record.tuning or {}
    fitted = ""
    if "loss_initial" in fit:
        fitted = (f"; {fit.get('tuner')} fit: output MSE {fit['loss_initial']:.4g} -> {fit['loss_final']:.4g} in "
                  f"{fit.get('steps')} steps")
        if fit.get("fell_back"):
            fitted += " (no improvement: kept the closed form)"
    _emit(data, as_json, f"{task}@{record.version}: {method}, lam1={record.lam1:.4g} lam2={record.lam2:.4g}, "
                         f"{_human(data['own_bytes'])} on disk, {data['ratio_fp16']:.1f}x smaller than fp16{fitted}")


def _tuning_summary(tuning: dict[str, Any] | None) -> str:
    """The fit record in one line; `show --json` has all of it (loss curve, per-tensor pairs)."""
    if not tuning:
        return "-"
    keys = ("tuner", "per_layer", "loss_initial", "loss_final", "steps", "lr", "seed", "fell_back", "reason",
            "seconds")
    parts = [f"{k}={tuning[k]:.4g}" if isinstance(tuning[k], float) else f"{k}={tuning[k]}"
             for k in keys if tuning.get(k) is not None]
    calibration = tuning.get("calibration")
    if isinstance(calibration, dict) and calibration.get("sha256"):
        parts.append(f"calibration={calibration['sha256'][:12]} ({calibration.get('examples')} examples)")
    return ", ".join(parts)


def _version_summary(reg: Registry, record) -> dict[str, Any]:
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
        **stats,
    }


@cli.command()
@registry_arg
@click.argument("spec", metavar="TASK[@VERSION]")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Directory to write.")
@click.option("--device", default="cpu", show_default=True, help="Where to decode: cpu, cuda, cuda:1...")
@click.option("--dtype", type=click.Choice(DTYPES), help="Cast floating weights (default: the finetune's dtypes).")
@click.option("--no-verify", is_flag=True, help="Skip rehashing the arrays read (faster; trusts the disk).")
@json_option
@click.pass_context
def materialize(ctx, registry: Path, spec: str, out: Path, device: str, dtype, no_verify: bool, as_json) -> None:
    """Rebuild TASK's weights as a Hugging Face directory at --out."""
    task, version = parse_spec(spec)
    reg = Registry(registry)
    path = reg.save_pretrained(task, out, version, device=device, dtype=_torch_dtype(dtype), verify=not no_verify,
                               progress=_progress(ctx))
    _, record = reg.version(task, version)
    data = {"task": task, "version": record.version, "out": str(path)}
    _emit(data, as_json, f"wrote {task}@{record.version} to {path}")


@cli.command("ls")
@registry_arg
@json_option
def ls(registry: Path, as_json: bool) -> None:
    """List tasks (latest version) and base vectors."""
    reg = Registry(registry)
    tasks = []
    for task in reg.tasks():
        versions = reg.versions(task)
        _, record = reg.version(task)
        tasks.append({"task": task, "latest": record.version, "versions": len(versions), "method": record.method,
                      "created": record.created, "message": record.message})
    data = {"registry": str(registry), "tasks": tasks, "bases": reg.bases()}
    lines = [f"{t['task']}@{t['latest']}  {t['method']:<8}  {t['versions']} version(s)  {t['message']}" for t in tasks]
    lines += [f"base {b}" for b in reg.bases()]
    _emit(data, as_json, "\n".join(lines) or "(empty registry)")


@cli.command()
@registry_arg
@click.argument("spec", metavar="TASK[@VERSION]")
@json_option
def show(registry: Path, spec: str, as_json: bool) -> None:
    """Show one task version: method, lambdas, base, bytes and ratios."""
    task, version = parse_spec(spec)
    reg = Registry(registry)
    _, record = reg.version(task, version)
    data = _version_summary(reg, record)
    text = "\n".join([
        f"{task}@{record.version}  {record.created}  {record.message}",
        f"  method     {record.method} {json.dumps(record.config)}",
        f"  lambdas    lam1={record.lam1:.6g}  lam2={record.lam2:.6g}",
        f"  base       {data['base_name'] or '-'} {(record.base or '')[:12]}",
        f"  tensors    {data['tensors']} ({data['delta_tensors']} as deltas)",
        f"  on disk    {_human(data['own_bytes'])} own ({_human(data['amortized_bytes'])} amortized over tasks "
        f"sharing objects) + {_human(data['base_share_bytes'])} base share",
        f"  ratio      {data['ratio_fp16']:.1f}x vs fp16, {data['ratio_source_dtype']:.1f}x vs the finetune's "
        f"dtype, {data['ratio_fp16_with_base_share']:.1f}x vs fp16 with the base share, "
        f"{data['ratio_fp16_amortized']:.1f}x amortized",
        f"  tuning     {_tuning_summary(record.tuning)}",
    ])
    _emit(data, as_json, text)


@cli.command()
@registry_arg
@click.argument("task")
@json_option
def log(registry: Path, task: str, as_json: bool) -> None:
    """History of TASK, newest first."""
    reg = Registry(registry)
    records = reg.log(task)
    data = [{"version": r.version, "created": r.created, "message": r.message, "method": r.method,
             "lam1": r.lam1, "lam2": r.lam2, "parent": r.parent} for r in records]
    _emit(data, as_json, "\n".join(f"{task}@{r.version}  {r.created}  {r.method:<8}  {r.message}" for r in records))


@cli.command()
@registry_arg
@json_option
@click.pass_context
def verify(ctx: click.Context, registry: Path, as_json: bool) -> None:
    """Rehash every object and check every reference; exit 4 if anything is wrong."""
    reg = Registry(registry)
    problems = reg.verify(progress=_progress(ctx))
    _emit({"ok": not problems, "problems": problems}, as_json,
          "\n".join(f"{p['object']}: {p['problem']} (used by {p['used_by']})" for p in problems) or "ok")
    if problems:
        ctx.exit(EXIT_VERIFY_FAILED)


@cli.command()
@registry_arg
@json_option
def gc(registry: Path, as_json: bool) -> None:
    """Delete objects no task, base or reference uses, and leftovers of killed commits."""
    removed = Registry(registry).gc()
    _emit(removed, as_json, f"removed {removed['arrays']} arrays, {removed['blobs']} blobs, {removed['records']} "
                            f"records, {removed['staging']} leftovers: {_human(removed['bytes'])}")


@cli.command()
@registry_arg
@click.argument("spec", metavar="TASK[@VERSION]")
@json_option
def rm(registry: Path, spec: str, as_json: bool) -> None:
    """Remove a task version (or the whole task); `gc` then frees its bytes."""
    task, version = parse_spec(spec)
    removed = Registry(registry).remove(task, version)
    _emit({"task": task, "removed": removed}, as_json, f"removed {task} version(s) {removed}; run gc to free space")


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
