"""Progress bars for long work (rich), silenced when not wanted.

On stderr, so that output meant for machines (`--json -`) keeps stdout to itself.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class progress_bar:
    """A single rich progress bar: `advance()` per step, `close()` at the end."""

    def __init__(self, total: int, description: str, enabled: bool = True):
        self._progress = None
        if enabled:
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                console=Console(stderr=True),
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task(description, total=total, info="")

    def advance(self, steps: int = 1, info: str | None = None) -> None:
        if self._progress is not None:
            fields = {"info": info} if info is not None else {}
            self._progress.update(self._task, advance=steps, **fields)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
