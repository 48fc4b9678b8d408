"""Progress bars on stderr: shown on a terminal unless asked otherwise (``enabled``)."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress(iterable, *, total: int | None, desc: str, enabled: bool | None, unit: str = "tensor"):
    show = sys.stderr.isatty() if enabled is None else enabled
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not show, file=sys.stderr, leave=False)
