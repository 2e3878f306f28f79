"""The ``gradcam`` command line: thin typer commands over the library. No map is computed here."""

from __future__ import annotations

import sys

import typer
from typer.exceptions import TyperException

from gradcam.cli import evaluate, explain, report, serve  # noqa: F401  (each module registers its commands on the app)
from gradcam.cli.common import app, fail, stderr

try:
    from gradcam.cli.study import study_app
except ImportError as missing:  # the serve extra (SQLAlchemy, FastAPI) is not installed
    _missing = missing.name

    @app.command("study", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def _study_needs_serve_extra() -> None:
        """Human trust studies (needs the serve extra)."""
        raise fail(
            f"gradcam study needs the serve extra ({_missing} is missing): pip install 'gradcam[serve]'"
        )
else:
    app.add_typer(study_app, name="study")

__all__ = ["app", "main"]


def main() -> None:
    """Entry point of the ``gradcam`` command: usage mistakes get one line on stderr, exit code 2."""
    command = typer.main.get_command(app)
    try:
        code = command.main(standalone_mode=False)
    except TyperException as error:  # typer's usage errors: unknown option, bad value, missing argument
        message = " ".join(error.format_message().split())
        if message:  # empty when no arguments were given and the help has been shown
            stderr.print(f"error: {message}", markup=False)
        code = error.exit_code
    except typer.Abort:
        stderr.print("error: aborted", markup=False)
        code = 1
    sys.exit(code if isinstance(code, int) else 0)
