"""``gradcam serve``: the explanation service, web app and trust study (see :mod:`gradcam.serve`)."""

from __future__ import annotations

import secrets
import socket
from pathlib import Path
from typing import Annotated

import typer

from gradcam import models
from gradcam.cli.common import DeviceOption, RandomOption, app, fail, parse_device, stderr
from gradcam.errors import GradCAMError


def _check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise fail(f"--host {host} --port {port}: cannot listen there ({error.strerror})") from None


@app.command("serve")
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8000,
    model: Annotated[
        list[str] | None,
        typer.Option(
            "--model", "-m", help="A model to serve; repeat for several (the first is the default)."
        ),
    ] = None,
    db: Annotated[
        str | None,
        typer.Option(help="SQLAlchemy URL of the study database (default sqlite:///gradcam-study.db)."),
    ] = None,
    admin_token: Annotated[
        str | None,
        typer.Option(
            envvar="GRADCAM_ADMIN_TOKEN", help="Token for study administration (default: generated, printed)."
        ),
    ] = None,
    study_images: Annotated[
        Path | None, typer.Option(help="Folder whose subfolders an admin may choose as a study's images.")
    ] = None,
    max_upload: Annotated[float, typer.Option(min=0.001, help="Largest upload in MB (413 above).")] = 20.0,
    max_pixels: Annotated[int, typer.Option(min=1, help="Largest image in pixels (413 above).")] = 50_000_000,
    max_decoding_pixels: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Pixels decoded at once, all uploads together (503 with Retry-After above; "
            "default: twice --max-pixels).",
        ),
    ] = None,
    read_timeout: Annotated[
        float, typer.Option(min=0.001, help="Seconds a request body may stall between two chunks (then 408).")
    ] = 15.0,
    body_timeout: Annotated[
        float, typer.Option(min=0.001, help="Seconds a whole request body may take to arrive (then 408).")
    ] = 120.0,
    workers: Annotated[int, typer.Option(min=1, max=64, help="Threads running models.")] = 2,
    max_batch: Annotated[
        int, typer.Option(min=1, max=256, help="Most images merged into one forward/backward.")
    ] = 16,
    slow_methods: Annotated[
        bool, typer.Option(help="Also offer Score-CAM and Ablation-CAM (one forward per channel: minutes).")
    ] = False,
    device: DeviceOption = "cpu",
    random_weights: RandomOption = False,
) -> None:
    """Serve the JSON API (/v1, schema at /openapi.json), the web app (/) and the trust study."""
    try:
        import uvicorn

        from gradcam.serve.app import MEGABYTE, ServeSettings, create_app
    except ImportError as missing:
        raise fail(
            f"gradcam serve needs the serve extra ({missing.name} is missing): pip install 'gradcam[serve]'"
        ) from None

    chosen = model or [models.DEFAULT]
    for name in chosen:
        try:
            models.check(name)
        except GradCAMError as error:  # its message starts with "model '<name>'"
            raise fail(f"--{error}") from None
    if study_images is not None and not study_images.is_dir():
        raise fail(f"--study-images {study_images}: not a folder")
    parse_device(device)
    token = admin_token or secrets.token_urlsafe(24)
    if len(token) < 16:
        raise fail("--admin-token must be at least 16 characters")

    def loader(name: str, device: str | None = None) -> models.LoadedModel:
        return models.load(name, pretrained=not random_weights, device=device)

    try:
        settings = ServeSettings(
            models=chosen,
            device=device,
            max_upload=int(max_upload * MEGABYTE),
            max_pixels=max_pixels,
            max_decoding_pixels=max_decoding_pixels,
            read_timeout=read_timeout,
            body_timeout=body_timeout,
            db_url=db,
            admin_token=token,
            study_images=study_images,
            workers=workers,
            max_batch=max_batch,
            slow_methods=slow_methods,
            loader=loader,
        )
    except GradCAMError as error:  # limits that contradict each other, named by their options
        raise fail(str(error)) from None
    _check_port_free(host, port)
    try:
        application = create_app(settings)
    except GradCAMError as error:
        raise fail(str(error)) from None
    except Exception as error:  # a bad --db URL or an unreachable database
        raise fail(f"--db: {' '.join(str(error).split())[:300]}") from None
    if admin_token is None:
        stderr.print(f"admin token (study administration): {token}", markup=False)
    stderr.print(f"serving {', '.join(chosen)} on http://{host}:{port}/", markup=False)
    uvicorn.run(application, host=host, port=port, log_level="info")
