"""What every command shares: the Typer app, the consoles (results on stdout, the
rest on stderr), problems printed as ``error:`` lines, the plug-in registry with its
load failures as warnings, tables printed whole, progress bars."""

from __future__ import annotations

import unicodedata

import typer
from rich.console import Console, RenderableType
from rich.measure import Measurement
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

from ..errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help="Prompt learning for CLIP-like models.")
out = Console()
err = Console(stderr=True)


def _one_line(text: str) -> str:
    """``text`` as one printable line: line breaks, other control characters (a
    terminal would obey escape sequences) and lone surrogates written as escapes."""
    return "".join(
        ch.encode("unicode_escape").decode("ascii") if unicodedata.category(ch) in ("Cc", "Zl", "Zp", "Cs") else ch
        for ch in text
    )


def _fail(exc: UserError) -> None:
    """Print each problem as one ``error:`` line (its text verbatim, never read as
    markup: it may quote the spec) and exit with the error's code: 2 when what was asked
    for is wrong, 1 when the file system refused a file (a full disk...)."""
    for line in exc.problems:
        err.print(Text.assemble(("error:", "red"), " ", _one_line(line)), soft_wrap=True)
    raise typer.Exit(exc.exit_code)


def _interrupted(exc: KeyboardInterrupt, where: str) -> None:
    """A command stopped by Ctrl-C or SIGTERM: one line (which, and where what was done
    is: ``where``), and exit code 128 + the signal's number (130 for Ctrl-C, 143 for
    SIGTERM), as a shell reports a process that signal ended."""
    from ..engine import Terminated, exit_code

    what = f"interrupted ({exc})" if isinstance(exc, Terminated) else "interrupted"
    err.print(Text(f"{what}: {_one_line(where)}"), soft_wrap=True)
    raise typer.Exit(exit_code(exc))


def _registry():
    from ..plugins import get_registry

    reg = get_registry()
    for f in reg.failures:
        err.print(Text.assemble(("warning:", "yellow"), " ", _one_line(
            f"plug-in {f.entry_point} ({f.distribution}) failed to load: {f.error}")), soft_wrap=True)
    return reg


def _print_whole(console: Console, renderable: RenderableType) -> None:
    """Print a table on ``console``: on a terminal, fitted to its width; elsewhere (a log
    file, CI), whose width is not known and would be taken as 80 columns, at the width
    the table needs, so that every row stays on one line."""
    if console.is_terminal:
        console.print(renderable)
        return
    need = Measurement.get(console, console.options.update_width(10_000), renderable).maximum
    Console(file=console.file, width=max(need, console.width)).print(renderable)


def _bars() -> Progress:
    """Progress bars on stderr, removed when done."""
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn()]
    return Progress(*columns, console=err, transient=True)


def _reporter(bars: Progress):
    """The engine's :class:`~vlprompt_core.engine.ProgressReporter` drawing on ``bars``."""
    from ..engine import ProgressReporter

    def stop(task):
        if not err.is_terminal:  # no bars in a log file: one line per finished step instead
            done = next(t for t in bars.tasks if t.id == task)
            err.print(Text(f"{done.description}: done in {done.elapsed:.1f} s"), soft_wrap=True)
        bars.remove_task(task)

    return ProgressReporter(
        start=lambda desc, total: bars.add_task(desc, total=total),
        advance=lambda task, n=1: bars.advance(task, n),
        stop=stop,
    )
