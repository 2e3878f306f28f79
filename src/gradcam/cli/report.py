"""``gradcam report``: a static HTML gallery of a dataset run (see :mod:`gradcam.batch.gallery`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gradcam.batch.gallery import write_gallery
from gradcam.cli.common import app, fail, stdout
from gradcam.errors import GradCAMError


@app.command("report")
def report(
    run_dir: Annotated[
        Path,
        typer.Argument(
            metavar="DIR", help="The --out folder of a `gradcam explain` run on a folder, glob or list."
        ),
    ],
    thumbnail_size: Annotated[
        int, typer.Option(min=16, max=4096, help="Longer side of the JPEG thumbnails, in pixels.")
    ] = 256,
) -> None:
    """Write DIR/index.html: a gallery of the run's maps that opens from the file system.

    One card per image and class (thumbnail, class, probability, rank, top-5), sortable and filterable
    by class, probability, path and surprising cases; thumbnails go to DIR/thumbs/ (kept when up to
    date). Prints the path of index.html."""
    try:
        index = write_gallery(run_dir, thumbnail_size=thumbnail_size)
    except GradCAMError as error:
        raise fail(str(error)) from None
    except OSError as error:
        raise fail(f"{run_dir}: cannot write the gallery ({error.strerror or error})") from None
    stdout.print(str(index), markup=False, highlight=False, soft_wrap=True)
