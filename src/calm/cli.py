"""The `calm` command line: a thin group; each command lives in `calm.commands.<name>`.

Errors: click's own usage errors print as click prints them (usage line, exit status 2). A user
error prints one line, ``calm: error: <what and which file>``, and exits with status 1: a
`calm.CalmError` (ModelFileError, StoreError, DatasetError, ...), an OSError (a full disk, a
read-only file system), a scikit-learn parameter check (`InvalidParameterError`) or a command's
own `click.ClickException`. Anything else is a bug: one line, ``calm: internal error (a bug,
please report it): <Type>: <message>; ...``, exit status 3 (`INTERNAL_ERROR`). ``calm --debug``
or ``CALM_DEBUG=1`` shows the traceback as well.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from typing import Any

import click

from calm._version import __version__
from calm.errors import CalmError

# command name -> "module:attribute"; imported only when the command runs (keeps `calm --help` fast).
COMMANDS = {
    "detect": "calm.commands.detect:detect",
    "extract": "calm.commands.extract:extract",
    "prompts": "calm.commands.prompts:prompts",
    "evaluate": "calm.commands.evaluate:evaluate",
    "evaluate-detection": "calm.commands.evaluate_detection:evaluate_detection",
    "fit": "calm.commands.fit:fit",
    "predict": "calm.commands.predict:predict",
    "serve": "calm.commands.serve:serve",
    "verify": "calm.commands.verify:verify",
}

DEBUG_HINT = "rerun with --debug (or CALM_DEBUG=1) for the traceback"
USER_ERROR = 1  # exit status of a user error (click's usage errors keep their 2)
INTERNAL_ERROR = 3  # exit status of a bug


def one_line(text: str) -> str:
    """``text`` with its lines joined by " | " (a message may quote a multi-line library error)."""
    return " | ".join(part.strip() for part in str(text).splitlines() if part.strip())


def is_user_error(exc: BaseException) -> bool:
    """Whether ``exc`` is the user's doing (see the module doc) rather than a bug."""
    if isinstance(exc, CalmError | OSError | click.ClickException):
        return True
    # scikit-learn's parameter checks (a ValueError); only loaded once sklearn is, so never imported here
    sk = sys.modules.get("sklearn.utils._param_validation")
    return sk is not None and isinstance(exc, sk.InvalidParameterError)


def describe(exc: BaseException) -> str:
    """The one-line message for a user error that stopped a command."""
    if isinstance(exc, click.ClickException):
        return one_line(exc.format_message())
    if isinstance(exc, OSError) and exc.strerror:
        names = [str(n) for n in (exc.filename, exc.filename2) if n is not None]
        return one_line(f"{exc.strerror}" + (f": {' -> '.join(names)}" if names else ""))
    return one_line(str(exc) or type(exc).__name__)


def error_line(exc: BaseException) -> str:
    """The line printed for ``exc``: ``calm: error: ...`` for a user error, else the bug line."""
    if is_user_error(exc):
        return f"calm: error: {describe(exc)}"
    what = one_line(f"{type(exc).__name__}: {exc}")
    return f"calm: internal error (a bug, please report it): {what}; {DEBUG_HINT}"


def _debug_requested(ctx: click.Context) -> bool:
    return bool(ctx.params.get("debug")) or os.environ.get("CALM_DEBUG", "") not in ("", "0")


def _report(exc: BaseException, debug: bool) -> None:
    if debug:
        shown = exc.__context__ if isinstance(exc, click.ClickException) and exc.__context__ else exc
        traceback.print_exception(type(shown), shown, shown.__traceback__, file=sys.stderr)
    click.echo(error_line(exc), err=True)


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)

    def invoke(self, ctx: click.Context) -> Any:
        """Run the command; turn what stops it into one ``calm: error:`` line (see the module doc)."""
        try:
            return super().invoke(ctx)
        except (click.UsageError, click.exceptions.Exit, click.Abort, KeyboardInterrupt, SystemExit):
            raise
        except click.ClickException as exc:  # a command's own error: same one-line form
            _report(exc, _debug_requested(ctx))
            sys.exit(exc.exit_code)
        except Exception as exc:
            _report(exc, _debug_requested(ctx))
            sys.exit(USER_ERROR if is_user_error(exc) else INTERNAL_ERROR)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="calm")
@click.option(
    "--debug", is_flag=True, help="Show the full traceback when a command fails (or set CALM_DEBUG=1)."
)
def main(debug: bool) -> None:
    """Few-shot audio classification from frozen audio-language models (CALM, SAV)."""


if __name__ == "__main__":  # pragma: no cover
    main()
