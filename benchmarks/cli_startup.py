"""How long the ``deltastore`` command takes to answer (issue 11: 3.4-4.3 s before, nearly all
of it importing torch and transformers; the target is under half a second for ``--help`` and
``ls``).

Builds a registry of the demo's tiny BERT with two tasks (three versions), then runs each
command as a new process, the way a user does, ``RUNS`` times, and reports the median and
the spread of wall-clock times, next to ``python -c pass`` and ``import torch`` for scale.
Also reports the machine's load average, since the machine may be shared. Writes
benchmarks/results/cli_startup.{md,json}.

    python benchmarks/cli_startup.py        # about a minute on 2 CPU cores
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
RUNS = 9
ROOT = Path(__file__).resolve().parents[1]


def timed(argv: list[str]) -> float:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "cli")]))
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    return time.perf_counter() - start


def main() -> None:
    from deltastore import Registry
    from deltastore.demo import make_example

    work = Path(tempfile.mkdtemp(prefix="deltastore-cli-startup-"))
    example = make_example(work / "example", steps=2)
    reg = Registry.init(work / "reg", example.reference, progress=False)
    reg.build_base("all", list(example.finetunes.values()), progress=False)
    reg.commit("has_top", example.finetunes["has_top"], base="all", progress=False)
    reg.commit("has_top", example.finetunes["has_top"], method="dare", progress=False)
    reg.commit("has_small", example.finetunes["has_small"], base="all", progress=False)

    script = Path(sys.executable).with_name("deltastore")  # the console script a user runs, if installed
    cli = [str(script)] if script.exists() else [sys.executable, "-m", "deltastore_cli.main"]
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "python -c 'import torch'": [sys.executable, "-c", "import torch"],
        "deltastore --help": cli + ["--help"],
        "deltastore ls": cli + ["ls", str(reg.path)],
        "deltastore log has_top": cli + ["log", str(reg.path), "has_top"],
        "deltastore show has_top": cli + ["show", str(reg.path), "has_top"],
        "deltastore base ls": cli + ["base", "ls", str(reg.path)],
        "deltastore verify (imports torch)": cli + ["verify", str(reg.path)],
    }
    load_before = os.getloadavg()
    rows = {}
    for name, argv in commands.items():
        timed(argv)  # warm the page cache: we measure imports, not the first read of the disk
        times = sorted(timed(argv) for _ in range(RUNS))
        rows[name] = {"median_s": statistics.median(times), "min_s": times[0], "max_s": times[-1]}
        print(f"{name:<36} median {rows[name]['median_s']:.2f} s  (min {times[0]:.2f}, max {times[-1]:.2f})",
              flush=True)
    load_after = os.getloadavg()
    shutil.rmtree(work)

    machine = {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
               "loadavg_1min_before": load_before[0], "loadavg_1min_after": load_after[0]}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cli_startup.json").write_text(json.dumps({"runs": RUNS, "machine": machine, "commands": rows},
                                                         indent=2) + "\n")
    lines = [
        "# CLI start-up time",
        "",
        f"`python benchmarks/cli_startup.py`: each command run {RUNS} times as a new process (after one warm-up",
        "run), wall-clock seconds. Target (issue 11): `--help` and `ls` under 0.5 s; before this change every",
        "command took 3.4-4.3 s, importing torch and transformers.",
        "",
        f"Machine: {machine['cpus']} CPUs, Python {machine['python']}; 1-minute load average "
        f"{load_before[0]:.1f} before and {load_after[0]:.1f} after (a shared machine: other processes inflate "
        "these figures).",
        "",
        "| command | median (s) | min (s) | max (s) |",
        "| --- | ---: | ---: | ---: |",
    ] + [f"| `{name}` | {r['median_s']:.2f} | {r['min_s']:.2f} | {r['max_s']:.2f} |" for name, r in rows.items()]
    (RESULTS / "cli_startup.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
