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


def format_seconds(seconds: float) -> str:
    """``m:ss`` (or ``h:mm:ss``) for the progress lines."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class PassProgress:
    """The pass-level display of a recipe run: one line per pass on stderr,

    ``[2/5] smoothquant          elapsed 0:03  ETA ~0:08``

    when :func:`progress_enabled` (``-q`` silences it; a calibration bar may appear under
    the line while the pass collects statistics). The ETA is the mean time of the passes
    done so far times the passes left, hence the ``~``; it is shown once a second has passed.
    :meth:`done` prints the closing line; ``detail`` lines (``-v``) follow their pass.
    """

    def __init__(self, total: int, *, progress: bool | None = None, width: int = 22, stream=None) -> None:
        import time

        self.total = total
        self.enabled = progress_enabled(progress)
        self.width = width
        self.stream = stream
        self._clock = time.perf_counter
        self.started = self._clock()
        self.finished = 0

    def _write(self, line: str) -> None:
        if self.enabled:
            print(line, file=self.stream or sys.stderr, flush=True)

    def start(self, index: int, name: str) -> None:
        """Pass ``index`` (0-based) named ``name`` begins."""
        elapsed = self._clock() - self.started
        eta = ""
        if self.finished and elapsed >= 1.0:  # after instant passes (canonicalize) it would say ~0:00
            eta = f"  ETA ~{format_seconds(elapsed / self.finished * (self.total - self.finished))}"
        self._write(f"[{index + 1}/{self.total}] {name:<{self.width}} elapsed {format_seconds(elapsed)}{eta}")

    def end(self, detail: Iterable[str] = ()) -> None:
        self.finished += 1
        for line in detail:
            self._write(f"      {line}")

    def done(self) -> None:
        self._write(f"done: {self.total} pass{'es' if self.total != 1 else ''} in "
                    f"{format_seconds(self._clock() - self.started)}")
