"""The CLI's user-error boundary, shared by every command module (no import of mptool.cli)."""

from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable

import typer
from typer._click import exceptions as click_errors  # typer 0.29 carries its own click (pinned <0.30)
from typer.core import TyperGroup

from mptool.errors import MptoolError


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The one boundary: a MptoolError prints one red line and exits 2; bugs keep their traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        # mptool shows its own rich progress; the libraries' tqdm bars would bury errors.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        try:
            _quiet_libraries()
            return fn(*args, **kwargs)
        except MptoolError as e:
            _print_error(str(e))
            raise typer.Exit(2) from None

    return wrapper


class OneLineErrors(TyperGroup):
    """Click's usage errors (unknown option, unparsable value, missing argument) as one line too.

    Typer draws them in a multi-line panel; mptool's rule is one line naming the problem and what
    is accepted, exit 2. Help (including a bare `mptool`) is still printed in full.
    """

    def main(self, args: Any = None, prog_name: Any = None, complete_var: Any = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        argv = sys.argv[1:] if args is None else [str(a) for a in args]
        command = f"mptool {argv[0]}" if argv and argv[0] in self.commands else "mptool"
        try:
            rv = super().main(args=argv, prog_name=prog_name, complete_var=complete_var,
                              standalone_mode=False, **extra)
        except click_errors.NoArgsIsHelpError as e:
            e.show()
            code = e.exit_code
        except click_errors.ClickException as e:
            _print_error(usage_line(e, command))
            code = e.exit_code
        except typer.Abort:
            _print_error("aborted")
            code = 1
        else:
            if not standalone_mode:
                return rv
            # Without standalone mode click returns a raised Exit's code, else the command's value.
            code = rv if isinstance(rv, int) else 0
        if standalone_mode:
            sys.exit(code)
        raise typer.Exit(code)


def usage_line(e: click_errors.ClickException, command: str = "mptool") -> str:
    """One line: click's message, whitespace collapsed, and where the accepted forms are listed.

    `command` names the help to point at when click raised without a context (a missing option
    value is raised by its parser, which has none).
    """
    message = " ".join(e.format_message().split())
    if isinstance(e, click_errors.UsageError):
        ctx = getattr(e, "ctx", None)
        message += f" (see '{ctx.command_path if ctx is not None else command} --help')"
    return message


def _print_error(message: str) -> None:
    from rich.console import Console
    from rich.markup import escape

    from mptool.progress import console

    out = Console(stderr=True) if console.quiet else console  # MPTOOL_QUIET silences progress, never an error
    out.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)


def _quiet_libraries() -> None:
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    disable_progress_bars()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


