"""Progress bars that appear on a terminal and stay out of logs.

``progress`` arguments across the package are tri-state: ``True`` always shows a bar,
``False`` never does (``--quiet``), ``None`` decides from the environment: a bar only
when stderr is a terminal and ``CI`` is not set.
"""

from __future__ import annotations

import os
import sys
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def progress_enabled(progress: bool | None) -> bool:
    """Resolve the tri-state ``progress`` flag."""
    if progress is not None:
        return bool(progress)
    stream = sys.stderr
    return stream is not None and hasattr(stream, "isatty") and stream.isatty() and "CI" not in os.environ


def track(
    items: Iterable[T], *, desc: str, total: int | None = None, unit: str = "it", progress: bool | None = None
) -> Iterator[T]:
    """Iterate ``items`` with a tqdm bar on stderr when :func:`progress_enabled`."""
    if not progress_enabled(progress):
        yield from items
        return
    from tqdm import tqdm

    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with tqdm(items, desc=desc, total=total, unit=unit, leave=False, file=sys.stderr) as bar:
        yield from bar
