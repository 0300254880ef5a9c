"""Terminal output: progress bars on a TTY, plain quiet lines elsewhere (CI, pipes)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")


def interactive() -> bool:
    return sys.stderr.isatty() and not os.environ.get("CI")


def info(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def warn(msg: str) -> None:
    """A warning the user must not miss: bold yellow on a terminal, marked with WARNING elsewhere."""
    if interactive():
        from rich.console import Console

        Console(stderr=True).print(f"[bold yellow]WARNING:[/] {msg}", highlight=False)
    else:
        info(f"WARNING: {msg}")


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a progress bar when a person is watching."""
    if not interactive():
        yield from items
        return
    from rich.console import Console
    from rich.progress import Progress

    # redirect_stdout=False: libraries' prints we silence on purpose (ORT's calibration) must stay silenced.
    with Progress(console=Console(stderr=True), transient=True, redirect_stdout=False, redirect_stderr=False) as bar:
        yield from bar.track(items, total=total, description=description)


@contextmanager
def progress(description: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """A bar counting images, with images/s and the time left, when a person is watching; yields `advance(n)`."""
    if not interactive():
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
               TimeRemainingColumn())  # fmt: skip
    with Progress(*columns, console=Console(stderr=True), transient=True, redirect_stdout=False,
                  redirect_stderr=False) as bar:  # fmt: skip
        task = bar.add_task(description, total=total, rate="")

        def advance(n: int) -> None:
            bar.advance(task, n)
            speed = bar.tasks[0].speed
            bar.update(task, rate=f"{speed:,.0f} img/s" if speed else "")

        yield advance
