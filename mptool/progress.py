"""Rich progress for every step longer than a few seconds (on stderr, so JSON on stdout stays clean)."""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True, quiet=bool(os.environ.get("MPTOOL_QUIET")))


@contextlib.contextmanager
def step(description: str, total: float | None = None) -> Iterator[Callable[..., None]]:
    """A progress bar for one step; yields ``advance(n=1, **fields)``."""
    columns = [TextColumn("[bold blue]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=total, info="")

        def advance(n: float = 1, info: str | None = None) -> None:
            progress.update(task, advance=n, **({"info": info} if info is not None else {}))

        yield advance
