"""The CLI's user-error boundary, shared by every command module (no import of mptool.cli)."""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import typer

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
            from rich.markup import escape

            from mptool.progress import console

            console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def _quiet_libraries() -> None:
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    disable_progress_bars()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


