"""Evaluate explanation methods over an annotated image folder: every metric, every method, baselines.

The runner behind ``gradcam evaluate``. For each image it explains one target per annotated class
(``target="annotated"``, the class's boxes are its ground truth) or the model's top-1 class
(``target="predicted"``, every annotated box counts, as class-agnostic localisation), then scores each
method's maps with:

- the pointing game and box localisation, on the map upsampled to the picture the map is laid over
  (the whole image for models that resize the whole frame; the crop otherwise, boxes moved with it);
- the top-1 / top-5 localisation error of the Grad-CAM paper (annotated targets);
- deletion and insertion AUC, Average Drop / Increase in Confidence and ROAD, on the model's inputs.

That is the ``standard`` set; ``metrics`` may name more (:mod:`gradcam.metrics.catalogue`: complexity,
relevance-mass localisation, pixel flipping, robustness, randomisation), or leave the standard set out.
The baselines ``random``, ``center`` and ``sobel`` are always scored beside the methods.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image

from gradcam import io
from gradcam.errors import GradCAMError, ImageLoadError
from gradcam.explanation import normalise, upsample
from gradcam.metrics import catalogue
from gradcam.metrics import localization as loc
from gradcam.metrics.annotations import Annotation, AnnotationSet, boxes_of
from gradcam.metrics.confidence import ConfidenceChange, confidence_change, win_percentage
from gradcam.metrics.perturbation import deletion, insertion
from gradcam.metrics.road import DEFAULT_FRACTIONS, road_curves
from gradcam.metrics.saliency import BASELINES, make_saliency, names
from gradcam.metrics.scoring import predict
from gradcam.models import LoadedModel, model_device

TARGET_MODES = ("annotated", "predicted")


@dataclass(frozen=True)
class EvaluationSettings:
    """What to evaluate and how. ``steps`` None is RISE's protocol (one image row of pixels per step)."""

    methods: tuple[str, ...] = ("gradcam", "gradcam++")
    target: str = "annotated"
    batch_size: int = 16
    steps: int | None = None
    road_fractions: tuple[float, ...] = DEFAULT_FRACTIONS
    box_threshold: float = loc.BOX_THRESHOLD
    min_iou: float = loc.IOU_THRESHOLD
    tolerance: float = loc.POINTING_TOLERANCE
    layer: str | None = None
    layout: str | None = None
    seed: int = 0
    metrics: tuple[str, ...] = (catalogue.STANDARD,)

    def __post_init__(self) -> None:
        catalogue.check(tuple(self.metrics))
        if self.target not in TARGET_MODES:
            raise GradCAMError(f"target must be one of {', '.join(TARGET_MODES)}; got '{self.target}'")
        if not self.methods:
            raise GradCAMError("methods is empty; name at least one method")
        unknown = [m for m in self.methods if m not in names()]
        if unknown:
            raise GradCAMError(f"method '{unknown[0]}' not found; available: {', '.join(names())}")
        if self.batch_size < 1:
            raise GradCAMError(f"batch size must be a positive integer, got {self.batch_size}")

    @property
    def standard(self) -> bool:
        """Whether the evaluation's own set of metrics runs."""
        return catalogue.STANDARD in self.metrics

    @property
    def more(self) -> list[str]:
        """The catalogue's metrics named, in order."""
        return [name for name in dict.fromkeys(self.metrics) if name != catalogue.STANDARD]

    @property
    def evaluated(self) -> list[str]:
        """The methods, then every baseline not already named."""
        return [*dict.fromkeys(self.methods)] + [b for b in BASELINES if b not in self.methods]


@dataclass
class MethodScores:
    """Per-target results of one method, in evaluation order."""

    pointing: list[bool] = field(default_factory=list)
    localized: list[bool] = field(default_factory=list)
    label_rank: list[int | None] = field(default_factory=list)
    deletion: list[torch.Tensor] = field(default_factory=list)
    insertion: list[torch.Tensor] = field(default_factory=list)
    fractions: torch.Tensor | None = None
    original: list[torch.Tensor] = field(default_factory=list)
    explained: list[torch.Tensor] = field(default_factory=list)
    road_morf: list[torch.Tensor] = field(default_factory=list)
    road_lerf: list[torch.Tensor] = field(default_factory=list)
    road_combined: list[torch.Tensor] = field(default_factory=list)
    count: int = 0  # targets scored
    more: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # the catalogue's, per batch

    def confidence(self) -> ConfidenceChange:
        return ConfidenceChange(torch.cat(self.original), torch.cat(self.explained))

    def auc(self, kind: str) -> float:
        """The mean over targets of the deletion or insertion curve's trapezoid AUC."""
        return float(torch.trapezoid(torch.cat(getattr(self, kind)), self.fractions).mean())

    def curve(self, kind: str) -> torch.Tensor:
        """The mean deletion or insertion curve over every target, (S+1,)."""
        return torch.cat(getattr(self, kind)).mean(dim=0)

    def summary(self, annotated: bool, standard: bool = True) -> dict[str, object]:
        """The method's numbers: the standard set (when it ran) and the mean of each further metric
        over the targets where it is defined (null where it is nowhere)."""
        out: dict[str, object] = {"targets": self.count}
        if standard:
            out.update(self._standard(annotated))
        for name, values in self.more.items():
            mean = torch.cat(values).double().nanmean()
            out[name] = None if torch.isnan(mean) else float(mean)
        return out

    def _standard(self, annotated: bool) -> dict[str, object]:
        n = len(self.pointing)
        confidence = self.confidence()
        top = {}
        if annotated:
            top = {
                "top1_localization_error": loc.localization_error(self.localized, self.label_rank, 1),
                "top5_localization_error": loc.localization_error(self.localized, self.label_rank, 5),
            }
        return {
            "pointing_game": sum(self.pointing) / n,
            "localization_accuracy": sum(self.localized) / n,
            **top,
            "deletion_auc": self.auc("deletion"),
            "insertion_auc": self.auc("insertion"),
            "average_drop": confidence.average_drop,
            "increase_in_confidence": confidence.increase_in_confidence,
            "road": {
                "morf": float(torch.cat(self.road_morf).mean()),
                "lerf": float(torch.cat(self.road_lerf).mean()),
                "combined": float(torch.cat(self.road_combined).mean()),
            },
        }


@dataclass
class EvaluationResult:
    """Everything one evaluation measured; :meth:`to_json` is what ``metrics.json`` holds."""

    model: str
    settings: EvaluationSettings
    images: int = 0
    scores: dict[str, MethodScores] = field(default_factory=dict)
    records: list[dict[str, object]] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        annotated, standard = self.settings.target == "annotated", self.settings.standard
        done = {name: s for name, s in self.scores.items() if s.count}
        wins = {
            a: {b: win_percentage(sa.confidence(), sb.confidence()) for b, sb in done.items() if b != a}
            for a, sa in (done.items() if standard else ())
        }
        settings = asdict(self.settings)
        settings["methods"] = list(self.settings.methods)
        settings["road_fractions"] = list(self.settings.road_fractions)
        settings["metrics"] = list(self.settings.metrics)
        return {
            "model": self.model,
            "images": self.images,
            "targets": next(iter(done.values())).count if done else 0,
            "target": self.settings.target,
            "baselines": list(BASELINES),
            "settings": settings,
            "better": {
                name: "higher" if catalogue.get(name).higher_is_better else "lower"
                for name in self.settings.more
            },
            "methods": {name: s.summary(annotated, standard) for name, s in done.items()},
            "win_percentage": wins,
            "errors": self.errors,
            "skipped": self.skipped,
        }


@dataclass
class _Target:
    path: Path
    label: int
    boxes: torch.Tensor  # in the frame's pixels
    frame_size: tuple[int, int]  # (H, W)
    label_rank: int | None
    image_index: int


def _targets_of(
    path: Path,
    image_index: int,
    objects: list[Annotation],
    image: Image.Image,
    loaded: LoadedModel,
    ranking: list[int],
    mode: str,
) -> tuple[list[_Target], list[int]]:
    """The image's targets, and the annotated classes dropped because no box of theirs is in the frame
    (outside the model's crop)."""
    size = loaded.preprocess.frame_size(image)
    moved = loaded.preprocess.frame_boxes(image, boxes_of(objects))
    inside = (moved[:, 2] > moved[:, 0]) & (moved[:, 3] > moved[:, 1])
    if mode == "predicted":
        return [_Target(path, ranking[0], moved[inside], size, 0, image_index)], []
    targets, outside = [], []
    labels = torch.tensor([o.label for o in objects])
    for label in dict.fromkeys(o.label for o in objects):
        boxes = moved[(labels == label) & inside]
        if len(boxes) == 0:
            outside.append(label)
            continue
        rank = ranking.index(label) if label in ranking else None
        targets.append(_Target(path, label, boxes, size, rank, image_index))
    return targets, outside


def evaluate(
    loaded: LoadedModel,
    images: Sequence[str | os.PathLike[str]],
    annotations: AnnotationSet,
    settings: EvaluationSettings | None = None,
    *,
    progress: Callable[[int], None] | None = None,
    on_error: Callable[[str, str], None] | None = None,
) -> EvaluationResult:
    """Score ``settings.methods`` and the baselines on ``images`` against ``annotations``.

    ``progress(n)`` is called as each method finishes n images. An image that cannot be read, or on
    which the model fails, is an error (``on_error(path, message)`` is called); an image without
    annotations, or an annotated class whose boxes all lie outside the model's crop, is skipped and
    listed. Neither stops the run. The model is left as found.
    """
    settings = settings or EvaluationSettings()
    model = loaded.module
    preprocess = loaded.preprocess
    mean = torch.tensor(preprocess.mean, dtype=torch.float64)
    black = -mean / torch.tensor(preprocess.std, dtype=torch.float64)
    maps_of = {
        name: make_saliency(
            name,
            model,
            layer=settings.layer,
            mean=preprocess.mean,
            std=preprocess.std,
            seed=settings.seed,
            layout=settings.layout,
        )
        for name in settings.evaluated
    }
    result = EvaluationResult(loaded.name, settings, scores={name: MethodScores() for name in maps_of})

    def fail(path: Path, message: str) -> None:
        result.errors.append({"image": str(path), "error": message})
        if on_error is not None:
            on_error(str(path), message)

    paths = [Path(p) for p in images]
    device = model_device(model)
    for start in range(0, len(paths), settings.batch_size):
        chunk = paths[start : start + settings.batch_size]
        tensors, loaded_images = [], []
        for path in chunk:
            objects = annotations.find(path)
            if not objects:
                result.skipped.append({"image": str(path), "reason": "no annotated objects"})
                continue
            try:
                image = io.load_image(path)
            except ImageLoadError as error:
                fail(path, str(error))
                continue
            tensors.append(preprocess(image))
            loaded_images.append((path, image, objects))
        try:
            if tensors:
                _evaluate_batch(
                    torch.stack(tensors).to(device), loaded_images, loaded, maps_of, black, result
                )
        except RuntimeError as error:  # the model's own forward failed on this batch
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            for path, _, _ in loaded_images:
                fail(path, f"{path}: the model failed on this image's batch ({reason})")
        if progress is not None:
            progress(len(chunk) * len(maps_of))
    return result


def _evaluate_batch(
    x: torch.Tensor,
    loaded_images: list[tuple[Path, Image.Image, list[Annotation]]],
    loaded: LoadedModel,
    maps_of: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]],
    black: torch.Tensor,
    result: EvaluationResult,
) -> None:
    settings, model = result.settings, loaded.module
    logits = predict(model, x)
    ranking = logits.argsort(dim=1, descending=True)[:, :5].tolist()
    targets: list[_Target] = []
    for index, (path, image, objects) in enumerate(loaded_images):
        found, outside = _targets_of(path, index, objects, image, loaded, ranking[index], settings.target)
        targets += found
        for label in outside:
            result.skipped.append(
                {"image": str(path), "reason": f"every box of class {label} lies outside the model's crop"}
            )
    if not targets:
        return
    rows = [t.image_index for t in targets]
    inputs = x[rows]
    labels = torch.tensor([t.label for t in targets], device=x.device)
    # The unperturbed probabilities come from the forward that ranked the classes: no second pass.
    base = torch.softmax(logits.double(), dim=1)[rows, labels.cpu()]
    scored = {
        name: _score(explain, model, inputs, labels, targets, settings, black, base, logits.shape[1])
        for name, explain in maps_of.items()
    }
    # Only once every method has scored the batch: a failure leaves no method with more targets than another.
    result.images += len({t.image_index for t in targets})
    for name, (update, records) in scored.items():
        update(result.scores[name])
        result.records += [{**r, "method": name, "class": loaded.labels[int(r["label"])]} for r in records]


def _score(
    explain: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    model: torch.nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    targets: list[_Target],
    settings: EvaluationSettings,
    black: torch.Tensor,
    base: torch.Tensor,
    classes: int,
) -> tuple[Callable[[MethodScores], None], list[dict[str, object]]]:
    """One method's metrics on one batch of targets: a function adding them to the method's scores,
    and the per-target records."""
    raw = explain(inputs, labels).detach().float().cpu()
    maps = normalise(upsample(raw, (inputs.shape[2], inputs.shape[3])))
    framed = [normalise(upsample(raw[row], target.frame_size)) for row, target in enumerate(targets)]
    records = [{"image": str(t.path), "label": t.label} for t in targets]
    updates: list[Callable[[MethodScores], None]] = []
    if settings.standard:
        updates.append(
            _standard(model, inputs, maps, framed, labels, targets, settings, black, base, records)
        )
    if settings.more:
        batch = catalogue.MetricBatch(
            model, inputs, maps, labels, explain, framed, [t.boxes for t in targets], classes, settings.seed,
            settings.batch_size,
        )  # fmt: skip
        more = {name: catalogue.get(name).score(batch).detach().double().cpu() for name in settings.more}
        for row, record in enumerate(records):
            record.update({name: _number(values[row]) for name, values in more.items()})
        updates.append(lambda scores: _add_more(scores, more))

    def update(scores: MethodScores) -> None:
        scores.count += len(targets)
        for step in updates:
            step(scores)

    return update, records


def _add_more(scores: MethodScores, more: dict[str, torch.Tensor]) -> None:
    for name, values in more.items():
        scores.more.setdefault(name, []).append(values)


def _number(value: torch.Tensor) -> float | None:
    return None if torch.isnan(value) else float(value)


def _standard(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    maps: torch.Tensor,
    framed: list[torch.Tensor],
    labels: torch.Tensor,
    targets: list[_Target],
    settings: EvaluationSettings,
    black: torch.Tensor,
    base: torch.Tensor,
    records: list[dict[str, object]],
) -> Callable[[MethodScores], None]:
    """The standard set on one batch: fills ``records``, returns the update of the method's scores."""
    common = {"model": model, "inputs": inputs, "maps": maps, "targets": labels}
    size = settings.batch_size
    removed = deletion(**common, steps=settings.steps, batch_size=size, unperturbed=base)
    inserted = insertion(**common, steps=settings.steps, batch_size=size, unperturbed=base)
    change = confidence_change(**common, black=black, batch_size=size, original=base)
    roads = road_curves(
        **common, fractions=settings.road_fractions, seed=settings.seed, batch_size=size, base=base
    )
    pointed, localized = [], []
    for row, target in enumerate(targets):
        pointed.append(loc.pointing_hit(framed[row], target.boxes, tolerance=settings.tolerance))
        localized.append(
            loc.localization_hit(
                framed[row], target.boxes, threshold=settings.box_threshold, min_iou=settings.min_iou
            )
        )
        records[row].update(
            {
                "pointing_hit": pointed[-1],
                "localized": localized[-1],
                "deletion_auc": float(removed.auc[row]),
                "insertion_auc": float(inserted.auc[row]),
                "drop": float(change.drop[row]),
                "road_combined": float(roads.combined[row]),
            }
        )

    def update(scores: MethodScores) -> None:
        scores.fractions = removed.fractions
        scores.deletion.append(removed.probabilities)
        scores.insertion.append(inserted.probabilities)
        scores.original.append(change.original)
        scores.explained.append(change.explained)
        scores.road_morf.append(roads.morf_mean)
        scores.road_lerf.append(roads.lerf_mean)
        scores.road_combined.append(roads.combined)
        scores.pointing += pointed
        scores.localized += localized
        scores.label_rank += [t.label_rank for t in targets]

    return update
