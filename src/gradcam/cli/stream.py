"""``gradcam explain`` over datasets: the streaming, resumable run behind folders, globs and lists."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from gradcam.batch.inputs import output_keys
from gradcam.batch.local import Job, run_local
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
        return Text(f"{task.speed:.1f} img/s" if task.speed else "- img/s")


def stream(
    job: Job, files: list[Path], settings: dict, overwrite: bool, as_json: bool, ray: dict | None = None
) -> None:
    """Run ``job`` over a dataset (see :mod:`gradcam.batch`) with the local engine, or on Ray when ``ray``
    holds the cluster's ``address`` and the workers' ``device``. ``settings`` are the run's (run.json);
    the engine is not one of them: a run begun by one engine can be finished by the other."""
    out = job.out
    try:
        output_folder(out)
        log = RunLog(out, settings, overwrite=overwrite)
    except GradCAMError as error:
        raise fail(str(error)) from None
    with log:
        keys = output_keys(files)
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
            report = {
                "progress": lambda n: progress.advance(task, n),
                "on_error": lambda message: progress.console.print(f"error: {message}", markup=False),
            }
            try:
                if ray is None:
                    summary = run_local(job, files, keys, log, **report)
                else:
                    from gradcam.batch.ray_engine import run_ray

                    summary = run_ray(
                        job, files, keys, log, address=ray["address"], device=ray["device"], **report
                    )
            except GradCAMError as error:
                raise fail(str(error)) from None
    document = {
        "images": summary.images,
        "targets": summary.targets,
        "errors": summary.errors,
        "already_done": summary.already_done,
        "images_per_second": round(summary.images_per_second, 2),
        "seconds": round(summary.seconds, 2),
        "layer": summary.layer,
        "manifest": str(out / "manifest.jsonl"),
    }
    if as_json:
        sys.stdout.write(json.dumps(document, indent=2) + "\n")
    else:
        stdout.print(
            f"{summary.images} images, {summary.targets} maps, {summary.errors} errors"
            f" ({summary.already_done} already done) in {summary.seconds:.1f} s,"
            f" {summary.images_per_second:.1f} images/s; manifest: {out / 'manifest.jsonl'}",
            markup=False,
            highlight=False,
        )
    if summary.errors:
        raise typer.Exit(1)
