"""``gradcam explain``: the one resumable run behind every input, a handful of files or a dataset."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from gradcam.batch.core import Job, Summary
from gradcam.batch.inputs import output_keys
from gradcam.batch.local import run_local
from gradcam.batch.manifest import RunLog
from gradcam.cli.common import fail, output_folder, stderr, stdout
from gradcam.errors import GradCAMError

#: More images than this are streamed even when given as files.
HANDFUL = 16


def streams(specs: list[str], files: list[Path]) -> bool:
    """True when the inputs name a dataset: a folder, a glob, a list file, or more than a handful."""
    named = [Path(spec) for spec in specs]
    dataset = any(
        p.is_dir() or (not p.exists() and (s.startswith("@") or bool(set("*?[") & set(s))))
        for s, p in zip(specs, named, strict=True)
    )
    return dataset or len(files) > HANDFUL


class _Rate(ProgressColumn):
    def render(self, task) -> Text:  # type: ignore[no-untyped-def]
        if task.fields.get("unit") == "chunks":
            return Text("")
        return Text(f"{task.speed:.1f} img/s" if task.speed else "- img/s")


class ChunkProgress:
    """The slow methods' progress callback (done, total), drawn as a second bar while a run shows one.

    It travels with the job to Ray workers without its bar (a worker has no terminal)."""

    def __init__(self) -> None:
        self._bar: Progress | None = None
        self._task: TaskID | None = None

    def attach(self, bar: Progress | None) -> None:
        self._bar, self._task = bar, None

    def __call__(self, done: int, total: int) -> None:
        if self._bar is None:
            return
        if self._task is None:
            self._task = self._bar.add_task("perturbed forwards", total=total, unit="chunks")
        self._bar.update(self._task, completed=done, total=total)

    def __getstate__(self) -> dict:
        return {"_bar": None, "_task": None}


def stream(
    job: Job,
    files: list[Path],
    settings: dict,
    overwrite: bool,
    as_json: bool,
    ray: dict | None = None,
    *,
    handful: bool = False,
    chunks: ChunkProgress | None = None,
) -> None:
    """Run ``job`` over ``files`` (see :mod:`gradcam.batch`) with the local engine, or on Ray when ``ray``
    holds the cluster's ``address`` and the workers' ``device``. ``settings`` are the run's (run.json);
    the engine is not one of them: a run begun by one engine can be finished by the other.

    A ``handful`` of files also gets its results (the manifest lines of those images, whether explained
    now or by an earlier run) as a table or in the JSON document; such a run replaces an earlier run of
    at most a handful of images made with other settings, as re-explaining it costs little."""
    out = job.out
    keys = output_keys(files)
    try:
        output_folder(out)
        log = RunLog(out, settings, overwrite=overwrite, replace_at_most=HANDFUL if handful else 0)
    except GradCAMError as error:
        raise fail(str(error)) from None
    with log:
        summary = _run(job, files, keys, log, ray, chunks)
        wanted = set(keys)
        records = [r for r in log.records if r["key"] in wanted] if handful else []
        failures = [log.errors[k] for k in keys if k in log.errors] if handful else []
    document = _document(summary, out, job, settings, records, failures, handful)
    if as_json:
        sys.stdout.write(json.dumps(document, indent=2) + "\n")
    else:
        if handful and records:
            _print_results(records, document, out)
        stdout.print(
            f"{summary.images} images, {summary.targets} maps, {summary.errors} errors"
            f" ({summary.already_done} already done) in {summary.seconds:.1f} s,"
            f" {summary.images_per_second:.1f} images/s; manifest: {out / 'manifest.jsonl'}",
            markup=False,
            highlight=False,
        )
    if summary.errors:
        raise typer.Exit(1)


def _run(
    job: Job, files: list[Path], keys: list[str], log: RunLog, ray: dict | None, chunks: ChunkProgress | None
) -> Summary:
    remaining = sum(1 for k in keys if k not in log.done)
    columns = (
        TextColumn("explaining"),
        BarColumn(),
        MofNCompleteColumn(),
        _Rate(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=stderr, transient=True, disable=not stderr.is_terminal) as progress:
        task = progress.add_task("explaining", total=remaining)
        if chunks is not None:
            chunks.attach(progress if stderr.is_terminal else None)
        report = {
            "progress": lambda n: progress.advance(task, n),
            "on_error": lambda message: progress.console.print(f"error: {message}", markup=False),
        }
        try:
            if ray is None:
                return run_local(job, files, keys, log, **report)
            from gradcam.batch.ray_engine import run_ray

            return run_ray(job, files, keys, log, address=ray["address"], device=ray["device"], **report)
        except GradCAMError as error:
            raise fail(str(error)) from None
        finally:
            if chunks is not None:
                chunks.attach(None)


def _document(
    summary: Summary,
    out: Path,
    job: Job,
    settings: dict,
    records: list[dict],
    failures: list[dict],
    handful: bool,
) -> dict:
    """The run's JSON document: its summary; for a handful of files also the results per image (the
    manifest lines, file paths joined to --out) and the errors."""
    document = {
        "images": summary.images,
        "targets": summary.targets,
        "errors": summary.errors,
        "already_done": summary.already_done,
        "images_per_second": round(summary.images_per_second, 2),
        "seconds": round(summary.seconds, 2),
        "layer": summary.layer or next((r.get("layer") for r in records if r.get("layer")), None),
        "manifest": str(out / "manifest.jsonl"),
    }
    if not handful:
        return document
    by_image: dict[str, dict] = {}
    for record in records:
        entry = by_image.setdefault(
            record["key"], {"image": record["image"], "predictions": record["top5"], "explanations": []}
        )
        shown = {k: v for k, v in record.items() if k not in ("key", "image", "top5", "of")}
        shown["files"] = {kind: str(out / path) for kind, path in record["files"].items()}
        entry["explanations"].append(shown)
    document.update(
        model=job.loaded.name,
        method=settings["method"],
        counterfactual=settings["counterfactual"],
        aug_smooth=settings["aug_smooth"],
        eigen_smooth=settings["eigen_smooth"],
        results=list(by_image.values()),
        failures=[{"image": f["image"], "error": f["error"]} for f in failures],
    )
    return document


def _print_results(records: list[dict], document: dict, out: Path) -> None:
    for result in document["results"]:
        if result["predictions"]:  # a classifier's
            top5 = ", ".join(f"{p['class']} {p['probability']:.1%}" for p in result["predictions"])
            stdout.print(f"{result['image']} top-5: {top5}", markup=False, highlight=False)
    table = Table(title=escape(f"{document['method']} · {document['model']} · layer {document['layer']}"))
    table.add_column("image", overflow="fold")
    table.add_column("class", overflow="fold")
    table.add_column("prob.", justify="right")
    table.add_column(escape(f"files written to {out}"), no_wrap=True)
    for record in records:
        table.add_row(
            escape(Path(record["image"]).name),
            escape(_what(record)),
            _probability(record),
            escape("\n".join(record["files"].values())),
        )
    stdout.print(table)


def _what(record: dict) -> str:
    """The table's class cell: the class and index, a detection's box, a mask's share, or why none."""
    if record.get("none"):
        return record["none"]
    text = f"{record['class']} ({record['target']})"
    if record.get("detection"):
        text += " box " + ",".join(f"{v:.0f}" for v in record["detection"]["box"])
    if record.get("mask"):
        text += f" mask {record['mask']['fraction']:.1%}"
    return text


def _probability(record: dict) -> str:
    if record.get("probability") is not None:
        return f"{record['probability']:.1%}"
    return f"{record['score']:.3g}" if record.get("score") is not None else "-"
