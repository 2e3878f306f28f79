"""The Ray engine: the local engine's output folder, manifest and resume rule, on a Ray cluster.

>>> summary = run_ray(job, paths, keys, log)                       # a local Ray instance
>>> summary = run_ray(job, paths, keys, log, address="auto")       # the cluster this machine is in

The pipeline is a Ray Data stream: ``from_items`` (index, path, key of every image not yet done) ->
``map_batches(_decode)`` (CPU tasks: read, check and preprocess each image exactly as the local engine's
:class:`~gradcam.batch.dataset.ImageDataset` does; an unreadable file becomes a row with an ``error``,
never an exception) -> ``map_batches(_ExplainActor)`` (a fixed pool of actors, one GPU each when the
job's model is on CUDA: each loads the job ONCE, explains a batch with
:func:`~gradcam.batch.core.explain`, writes its overlays and maps with
:func:`~gradcam.batch.core.records_for` and returns the manifest lines as a JSON string column) -> the
driver, which appends the lines of each batch to ``manifest.jsonl`` as it arrives (after the workers
wrote the files, so the crash rule of :mod:`gradcam.batch.manifest` holds), records errors and reports
progress.

What the actors get is the caller's :class:`~gradcam.batch.local.Job` itself, serialised once with
``torch.save`` (tensors copied to the CPU, no GPU memory is duplicated) and put in the object store;
each actor loads it with ``map_location`` set to its own device. So every actor explains with exactly
the caller's model (fine-tuned, random or pretrained weights alike) and method, and no worker node needs
the weights file, the labels file or the torch hub cache; it needs ``gradcam`` installed, as the driver
has it.

In a cluster the workers write the files: the input images and the output folder must be on a file
system every node mounts at the same path as the driver (NFS, a cluster file system). Paths are made
absolute before they are sent; the manifest keeps them as given, as the local engine does. Maps are
written as ``.npy`` files: ``maps="npz"`` (shards gathered in one process) is refused.
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradcam.batch import core
from gradcam.batch.core import Job, Summary, Tally
from gradcam.batch.dataset import ImageDataset, Sample
from gradcam.batch.manifest import RunLog
from gradcam.errors import GradCAMError
from gradcam.models import Preprocess

MISSING_RAY = "the ray engine needs Ray: pip install 'gradcam[ray]'"


def _import_ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError:
        raise GradCAMError(MISSING_RAY) from None
    return ray


def run_ray(
    job: Job,
    paths: Sequence[Path],
    keys: Sequence[str],
    log: RunLog,
    *,
    address: str | None = None,
    device: str | None = None,
    concurrency: int | None = None,
    actor_cpus: float | None = None,
    progress: Callable[[int], None] | None = None,
    on_error: Callable[[str], None] | None = None,
) -> Summary:
    """Explain every image not yet done in ``log`` on Ray, as :func:`~gradcam.batch.local.run_local` does.

    Same arguments, files, manifest lines, errors and :class:`~gradcam.batch.core.Summary`;
    ``job.workers`` is not used (Ray Data sizes the decoding itself).

    Args:
        address: the cluster: None (``RAY_ADDRESS`` when set, else a new local instance), ``"auto"``
            (the cluster this machine belongs to), ``"ray://head:10001"`` (Ray Client) or a GCS
            ``host:port``. A Ray instance already initialised in this process is used as it is (``address``
            is then ignored, and the instance left running); one this call starts is shut down when it
            returns.
        device: where the actors explain: ``"cpu"`` or ``"cuda"`` (one GPU per actor); by default where
            the job's model is. The driver never runs the model, so it may stay on the CPU of a head node
            without a GPU while the actors use ``"cuda"``.
        concurrency: explaining actors: by default one per GPU of the cluster when the model is on CUDA
            (each takes one GPU), one when it is on the CPU.
        actor_cpus: CPUs each actor reserves (torch's threads): by default 1 with a GPU, else half the
            CPUs of the cluster's largest node. The pool must fit the cluster with a CPU to spare for the
            decoding tasks, or the run waits for resources; with exactly 1 CPU per actor and no GPU, Ray
            Data fuses decoding into the actors (same results, less parallel decoding).
        progress: called with the number of images handled (explained or failed) as batches arrive.
        on_error: called with the message of each input that could not be explained.

    Raises:
        GradCAMError: Ray is not installed, ``job.maps`` is ``"npz"``, the cluster cannot be reached
            or has no GPU for a CUDA model, the job cannot be serialised, or a batch hit a mistake that
            stops the run (a GradCAMError of the method, an output folder that cannot be written). Inputs
            that cannot be read, and batches whose forward fails, are recorded as errors, not raised.
    """
    ray = _import_ray()
    if job.maps == "npz":
        raise GradCAMError(
            "the ray engine writes maps as .npy files; --maps npz is for the local engine (its shards "
            "are gathered in one process)"
        )
    on_gpu = _on_gpu(job, device)
    tally = Tally(log, keys, progress, on_error)
    todo = core.pending(keys, log)
    if todo:
        with _connected(ray, address):
            dataset = _pipeline(
                ray, job, on_gpu, [paths[i] for i in todo], [keys[i] for i in todo], concurrency, actor_cpus
            )
            with _quiet(ray):
                for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                    _record(batch, tally)
    return tally.finish()


def _on_gpu(job: Job, device: str | None) -> bool:
    """True when the actors are to explain on CUDA."""
    if device is None:
        return next(job.loaded.module.parameters()).device.type == "cuda"
    try:
        kind = torch.device(device).type
    except RuntimeError:
        kind = device
    if kind not in ("cpu", "cuda"):
        raise GradCAMError(f"device '{device}': the ray engine explains on cpu or cuda")
    return kind == "cuda"


def _pipeline(
    ray: Any,
    job: Job,
    on_gpu: bool,
    paths: list[Path],
    keys: list[str],
    concurrency: int | None,
    actor_cpus: float | None,
) -> Any:
    """The Ray Data stream over the images still to do: decoding tasks, then the explaining actors."""
    resources = ray.cluster_resources()
    if on_gpu and resources.get("GPU", 0) < 1:
        raise GradCAMError(
            "the ray engine was asked to explain on CUDA but the Ray cluster has no GPU; use --device cpu "
            "or a cluster with GPUs"
        )
    if concurrency is None:
        concurrency = max(1, int(resources.get("GPU", 0))) if on_gpu else 1
    if actor_cpus is None:
        actor_cpus = 1.0 if on_gpu else float(max(1, _largest_node_cpus(ray) // 2))
    payload = ray.put(_serialise(job))
    items = [
        {"index": i, "image": str(p), "read": str(Path(p).absolute()), "key": k}
        for i, (p, k) in enumerate(zip(paths, keys, strict=True))
    ]
    return (
        ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / job.batch_size)))
        .map_batches(
            _decode,
            fn_kwargs={
                "preprocess": job.loaded.preprocess,
                "overlay_size": job.overlay_size,
                "clip_length": job.loaded.clip_length,
            },
            batch_size=job.batch_size,
            batch_format="numpy",
            num_cpus=1,
        )
        .map_batches(
            _ExplainActor,
            fn_constructor_kwargs={"payload": payload, "device": "cuda" if on_gpu else "cpu"},
            batch_size=job.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=concurrency),
            num_gpus=1 if on_gpu else 0,
            num_cpus=actor_cpus,
        )
    )


def _record(batch: dict[str, np.ndarray], tally: Tally) -> None:
    """What the actors sent back for one batch, recorded in the driver (files are already in place)."""
    fatal = next((str(f) for f in batch["fatal"] if f), "")
    if fatal:
        raise GradCAMError(fatal)
    records: list[dict] = []
    layer = None
    for key, image, lines, error, found in zip(
        batch["key"], batch["image"], batch["records"], batch["error"], batch["layer"], strict=True
    ):
        if error:
            tally.failed(str(key), str(image), str(error))
        elif lines:
            records += json.loads(str(lines))
            layer = str(found)
    tally.written(records, layer)
    tally.handled(len(batch["key"]))


def _serialise(job: Job) -> bytes:
    """The job as ``torch.save`` bytes, its output folder absolute (the workers' working folder differs)."""
    buffer = io.BytesIO()
    try:
        torch.save(replace(job, out=job.out.absolute()), buffer)
    except Exception as error:  # pickling errors have no common type
        raise GradCAMError(
            f"the model cannot be sent to the Ray workers ({type(error).__name__}: {error}); remove hooks "
            "or attributes that cannot be pickled, or use the local engine"
        ) from None
    return buffer.getvalue()


def _largest_node_cpus(ray: Any) -> int:
    return max((int(node["Resources"].get("CPU", 0)) for node in ray.nodes() if node.get("Alive")), default=1)


@contextmanager
def _connected(ray: Any, address: str | None) -> Iterator[None]:
    """Ray initialised for the run: an instance already there is used and kept; one started here is
    shut down afterwards."""
    if ray.is_initialized():
        yield
        return
    options: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
    if address is None:
        options["include_dashboard"] = False
    try:
        ray.init(address=address, **options)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as error:
        where = f"at {address}" if address else "(local)"
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise GradCAMError(f"cannot start or reach the Ray cluster {where}: {first}") from None
    try:
        yield
    finally:
        ray.shutdown()


@contextmanager
def _quiet(ray: Any) -> Iterator[None]:
    """No Ray Data progress bars or execution banners (the caller reports progress), restored after."""
    context = ray.data.DataContext.get_current()
    saved = context.enable_progress_bars, getattr(context, "print_on_execution_start", True)
    loggers = [logging.getLogger(name) for name in ("ray.data", "ray.data._internal.progress")]
    levels = [logger.level for logger in loggers]
    context.enable_progress_bars, context.print_on_execution_start = False, False
    loggers[0].setLevel(max(levels[0], logging.WARNING))
    loggers[1].setLevel(logging.ERROR)  # only "progress bars disabled" and the like
    try:
        yield
    finally:
        context.enable_progress_bars, context.print_on_execution_start = saved
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _decode(
    batch: dict[str, np.ndarray], preprocess: Preprocess, overlay_size: int, clip_length: int | None = None
) -> dict[str, np.ndarray]:
    """Read and preprocess a batch of images or clips (a Ray task): the model inputs and the pictures the
    overlays are drawn on (both as objects: a segmenter's and a detector's inputs keep each image's own
    size), the frame sizes, and an error message ("" when none)."""
    dataset = ImageDataset([Path(str(p)) for p in batch["read"]], preprocess, overlay_size, clip_length)
    count = len(dataset)
    tensors = np.empty(count, dtype=object)
    pictures = np.empty(count, dtype=object)
    sizes = np.zeros((count, 2), np.int64)
    errors = []
    for row in range(count):
        sample = dataset[row]
        if sample.error is None:
            tensors[row] = sample.tensor.numpy()
            pictures[row] = sample.picture
            sizes[row] = sample.frame_size
            errors.append("")
        else:
            tensors[row] = np.zeros((1,), np.float32)
            pictures[row] = np.zeros((1, 1, 3), np.uint8)
            # The message names the path as the caller gave it, as the local engine's does.
            errors.append(sample.error.replace(str(batch["read"][row]), str(batch["image"][row])))
    return {
        "index": batch["index"],
        "image": batch["image"],
        "key": batch["key"],
        "tensor": tensors,
        "picture": pictures,
        "size": sizes,
        "error": np.array(errors, dtype=object),
    }


class _ExplainActor:
    """A Ray actor that loads the job once and then explains batch after batch, writing their files.

    Returns one row per input: its manifest lines as a JSON list (``records``), or its ``error``; and
    ``fatal``, set on every row when the batch hit a mistake no other batch would escape (a
    :class:`GradCAMError` of the method, an output folder that cannot be written), which the driver
    raises.
    """

    def __init__(self, payload: Any, device: str) -> None:
        import ray

        data = ray.get(payload) if isinstance(payload, ray.ObjectRef) else payload
        if device == "cpu":
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
            torch.set_num_threads(max(1, int(cpus)))
        self.device = torch.device(device)
        self.job: Job = torch.load(io.BytesIO(data), map_location=self.device, weights_only=False)

    def _explain(
        self,
        batch: dict[str, np.ndarray],
        good: list[int],
        keys: list[str],
        images: list[str],
        errors: list[str],
        lines: list[str],
    ) -> tuple[str, str]:
        """Explain and write the readable rows; fills ``errors`` and ``lines``, returns (fatal, layer)."""
        job, layer = self.job, ""
        tensors = [torch.as_tensor(np.asarray(batch["tensor"][row], dtype=np.float32)) for row in good]
        for rows, inputs in core.model_inputs(job, tensors, self.device):
            fatal, layer = self._explain_group(
                batch, [good[r] for r in rows], keys, images, errors, lines, inputs
            )
            if fatal:
                return fatal, ""
        return "", layer

    def _explain_group(
        self,
        batch: dict[str, np.ndarray],
        good: list[int],
        keys: list[str],
        images: list[str],
        errors: list[str],
        lines: list[str],
        inputs: object,
    ) -> tuple[str, str]:
        job = self.job
        try:
            result = core.explain(job, inputs)  # type: ignore[arg-type]
        except GradCAMError as error:
            return str(error), ""
        except RuntimeError as error:  # the model's own forward failed on these inputs
            reason = core.failure_reason(error)
            for row in good:
                errors[row] = f"{images[row]}: model failed ({reason})"
            return "", ""
        samples = [
            Sample(
                row,
                picture=np.asarray(batch["picture"][row]),
                frame_size=(int(batch["size"][row][0]), int(batch["size"][row][1])),
            )
            for row in good
        ]
        try:
            records = core.records_for(
                job, samples, [keys[r] for r in good], [Path(images[r]) for r in good], result, None
            )
        except OSError as error:
            return f"cannot write the outputs in {job.out}: {error.strerror or error}", ""
        per_key: dict[str, list[dict]] = {}
        for record in records:
            per_key.setdefault(record["key"], []).append(record)
        for row in good:
            lines[row] = json.dumps(per_key.get(keys[row], []), ensure_ascii=False)
        return "", result.layer or ""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = [str(k) for k in batch["key"]]
        images = [str(p) for p in batch["image"]]
        errors = [str(e) for e in batch["error"]]
        count = len(keys)
        lines, fatal, layer = [""] * count, "", ""
        good = [row for row in range(count) if not errors[row]]
        if good:
            fatal, layer = self._explain(batch, good, keys, images, errors, lines)
        return {
            "key": np.array(keys, dtype=object),
            "image": np.array(images, dtype=object),
            "records": np.array(lines, dtype=object),
            "error": np.array(errors, dtype=object),
            "layer": np.array([layer] * count, dtype=object),
            "fatal": np.array([fatal] * count, dtype=object),
        }
