"""``gradcam study``: create a trust study from the command line, list studies, read the results.

The protocol (Selvaraju et al., ICCV 2017, section 5.2) is described in :mod:`gradcam.study`; raters answer
through ``gradcam serve`` at the link ``create`` prints. ``create`` renders the study at once, through the
same domain steps as the service's background worker (:mod:`gradcam.study.creation`).
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from sqlalchemy.exc import SQLAlchemyError

from gradcam.cli.common import DeviceOption, fail, parse_device, stderr, stdout
from gradcam.errors import GradCAMError
from gradcam.models.pool import ModelPool
from gradcam.study import creation
from gradcam.study.pairs import list_images
from gradcam.study.results import StudyResults, ratings_csv, results_dict, summarise
from gradcam.study.store import (
    DEFAULT_DB_URL,
    MAX_INVITATIONS,
    DatabaseUnavailable,
    StudyError,
    StudyRow,
    StudyStore,
    database_url,
    sqlite_file,
)

study_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Human trust studies (Grad-CAM paper, section 5.2): which of two models do raters trust more?",
)

DbOption = Annotated[
    str, typer.Option("--db", help="Database: a SQLAlchemy URL or a SQLite file path.", show_default=True)
]
#: How many skipped images ``create`` names before summing up the rest.
SHOWN_SKIPS = 10


def _open(db: str, *, must_exist: bool) -> StudyStore:
    url = database_url(db)
    file = sqlite_file(url)
    if must_exist and file is not None and not file.is_file():
        raise fail(f"--db {db}: no study database at {file}; create a study first (gradcam study create)")
    try:
        return StudyStore(url)
    except DatabaseUnavailable as error:
        raise fail(f"--db {db}: cannot open the database ({_first_line(error)})") from None
    except GradCAMError as error:
        raise fail(f"--db {db}: {error}") from None
    except SQLAlchemyError as error:
        raise fail(f"--db {db}: cannot open the database ({_first_line(error)})") from None


def _first_line(error: SQLAlchemyError | DatabaseUnavailable) -> str:
    if isinstance(error, DatabaseUnavailable):
        return error.detail or str(error)
    return str(getattr(error, "orig", None) or error).splitlines()[0]


def _methods(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise fail("--methods is empty; expected comma-separated method names such as guided-gradcam")
    return names


@study_app.command("create")
def create(
    stronger: Annotated[str, typer.Option(help="The model expected to be better (the paper: VGG-16).")],
    weaker: Annotated[str, typer.Option(help="The other model (the paper: AlexNet).")],
    images: Annotated[Path, typer.Option(help="Folder of images (searched recursively).")],
    methods: Annotated[
        str, typer.Option(help="Comma-separated visualisation methods.")
    ] = "guided-backprop,guided-gradcam",
    annotations: Annotated[
        Path | None,
        typer.Option(help='JSON {"<image file name>": <class index or name>}: keep only correct images.'),
    ] = None,
    name: Annotated[str | None, typer.Option(help="The study's name (default: the folder's name).")] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seeds the sides and the image draw (default: random).")
    ] = None,
    max_images: Annotated[int | None, typer.Option(min=1, help="Keep at most this many images.")] = None,
    open_study: Annotated[
        bool,
        typer.Option(
            "--open",
            help="Let raters join by themselves at the rater page (a few per client address); by "
            "default raters come by invitation only (gradcam study invite).",
        ),
    ] = False,
    db: DbOption = DEFAULT_DB_URL,
    device: DeviceOption = "cpu",
) -> None:
    """Select the images both models classify alike, pre-render every pair, store the study."""
    if not images.is_dir():
        raise fail(f"--images {images}: not a folder")
    if seed is not None and not 0 <= seed < 2**31:
        raise fail(f"--seed {seed}: expected 0 .. {2**31 - 1}")
    record = StudyRow(
        name=name or images.resolve().name,
        stronger_model=stronger,
        weaker_model=weaker,
        methods=_methods(methods),
        folder=str(images.resolve()),
        annotations=str(annotations.resolve()) if annotations is not None else None,
        seed=seed if seed is not None else secrets.randbelow(2**31),
        open=open_study,
    )
    parse_device(device)
    pool, plan = _plan(record, images, annotations, max_images, device)
    store = _open(db, must_exist=False)  # only now: a mistake above leaves no database file behind
    try:
        study = _create(store, pool, plan, images)
    except (SQLAlchemyError, DatabaseUnavailable) as error:
        raise fail(f"--db {db}: cannot store the study ({_first_line(error)})") from None
    finally:
        store.close()
    for skipped in study.skipped[:SHOWN_SKIPS]:
        stderr.print(f"skipped {skipped.image}: {skipped.reason}", markup=False)
    if len(study.skipped) > SHOWN_SKIPS:
        stderr.print(f"skipped {len(study.skipped) - SHOWN_SKIPS} more images", markup=False)
    stdout.print(
        f"study {study.id}: {study.pairs} pairs ({study.kept} images x {len(study.methods)} methods), "
        f"{len(study.skipped)} images skipped, seed {study.seed}",
        markup=False,
        highlight=False,
    )
    if study.open:
        stdout.print(f"raters: /studies/{study.id}", markup=False, highlight=False)
    else:
        stdout.print(f"raters: by invitation: gradcam study invite {study.id} --count N", markup=False)
    stdout.print(f"results: /studies/{study.id}/results", markup=False, highlight=False)


@study_app.command("invite")
def invite(
    study: Annotated[str, typer.Argument(help="The study's id.")],
    count: Annotated[
        int, typer.Option("--count", "-n", min=1, max=MAX_INVITATIONS, help="Links to issue, one per rater.")
    ] = 1,
    base_url: Annotated[
        str, typer.Option(help="The server's address, put before each link (e.g. https://study.example.org).")
    ] = "",
    db: DbOption = DEFAULT_DB_URL,
) -> None:
    """Issue single-person rater links, one per line: /studies/<study>#<token>. The token sits in the URL
    fragment, which browsers never send (no server or proxy logs it); only its hash is stored, so keep
    the links: they cannot be shown again."""
    store = _open(db, must_exist=True)
    try:
        made = store.invite(study, count)
    except DatabaseUnavailable as error:
        raise fail(f"--db {db}: cannot store the invitations ({_first_line(error)})") from None
    except StudyError as error:
        raise fail(str(error)) from None
    finally:
        store.close()
    for invitation in made:
        typer.echo(f"{base_url.rstrip('/')}{invitation.link(study)}")
    stderr.print(f"{len(made)} rater links for study {study}; each is for one person", markup=False)


def _plan(
    record: StudyRow, images: Path, annotations: Path | None, max_images: int | None, device: str
) -> tuple[ModelPool, creation.StudyPlan]:
    """The models and the checked study, or a one-line error."""
    try:
        pool = ModelPool([record.stronger_model, record.weaker_model], device=device)
        found = list_images(images)
        return pool, creation.plan(pool, record, found, annotations=annotations, max_images=max_images)
    except creation.NothingKept as error:
        raise fail(f"--images {images}: {error.reason}") from None
    except GradCAMError as error:
        raise fail(str(error)) from None


def _create(store: StudyStore, pool: ModelPool, plan: creation.StudyPlan, images: Path) -> StudyRow:
    """Render and store the study, with a progress bar; a one-line error when no image is kept."""
    try:
        with _progress() as bar:
            task = bar.add_task("selecting and rendering", total=len(plan.images))
            return creation.create(
                store, pool, plan, progress=lambda done, _total: bar.update(task, completed=done)
            )
    except creation.NothingKept as error:
        raise fail(f"--images {images}: {error.reason}") from None
    except GradCAMError as error:
        raise fail(str(error)) from None


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=stderr,
        transient=True,
        disable=not stderr.is_terminal,
    )


@study_app.command("results")
def results(
    study: Annotated[str, typer.Argument(help="The study's id.")],
    db: DbOption = DEFAULT_DB_URL,
    csv: Annotated[
        Path | None, typer.Option("--csv", help="Also write the raw ratings to this CSV file.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
) -> None:
    """Mean score of the stronger model per method, with a bootstrap 95% interval."""
    store = _open(db, must_exist=True)
    try:
        found = store.study(study)
        if found is None:
            raise fail(f"study '{study}' not found in {db}; `gradcam study list` shows the studies")
        ratings = store.ratings(study)
        summary = summarise(found, ratings, store.pair_methods(study))
    except (SQLAlchemyError, DatabaseUnavailable) as error:
        raise fail(f"--db {db}: cannot read the study ({_first_line(error)})") from None
    finally:
        store.close()
    if csv is not None:
        try:
            csv.write_text(ratings_csv(found, ratings), encoding="utf-8")
        except OSError as error:
            raise fail(f"--csv {csv}: cannot write ({error.strerror or error})") from None
    if as_json:
        typer.echo(json.dumps(results_dict(summary), indent=2))
    else:
        _print_results(summary)
    if csv is not None:
        stderr.print(f"wrote {len(ratings)} ratings to {csv}", markup=False, highlight=False)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f}"


def _print_results(summary: StudyResults) -> None:
    study = summary.study
    table = Table(
        title=escape(
            f"{study.name} ({study.id}): {study.stronger_model} (stronger) vs {study.weaker_model}, "
            f"{summary.ratings} ratings by {summary.raters} raters"
        ),
        caption="score from the stronger model's side, -2..+2; 95% CI: percentile bootstrap",
    )
    for column in ("method", "mean", "95% CI", "ratings", "raters", "pairs", "note"):
        table.add_column(column, justify="left" if column in ("method", "note") else "right")
    for m in summary.methods:
        ci = "-" if m.interval.low is None else f"[{_number(m.interval.low)}, {_number(m.interval.high)}]"
        table.add_row(
            escape(m.method),
            _number(m.interval.mean),
            ci,
            str(m.ratings),
            str(m.raters),
            str(m.pairs),
            escape(m.interval.note or ""),
        )
    stdout.print(table)


@study_app.command("list")
def list_studies(db: DbOption = DEFAULT_DB_URL) -> None:
    """Every study in the database, newest first."""
    store = _open(db, must_exist=True)
    try:
        studies = store.list_studies()
    except (SQLAlchemyError, DatabaseUnavailable) as error:
        raise fail(f"--db {db}: cannot read the studies ({_first_line(error)})") from None
    finally:
        store.close()
    table = Table(title=f"{len(studies)} studies")
    for column in ("id", "name", "stronger", "weaker", "methods", "pairs", "raters", "ratings", "created"):
        table.add_column(column)
    for s in studies:
        table.add_row(
            s.id,
            escape(s.name),
            escape(s.stronger_model),
            escape(s.weaker_model),
            escape(",".join(s.methods)),
            str(s.pairs),
            str(s.raters),
            str(s.ratings),
            s.created.isoformat(timespec="seconds"),
        )
    stdout.print(table)
