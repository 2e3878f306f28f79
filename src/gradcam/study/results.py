"""The study's statistics and its raw ratings as CSV.

Each rating is scored from the stronger model's side: the rater's answer (on
:data:`gradcam.study.scale.SCALE`, +2 "Robot A is clearly more reliable than Robot B" .. -2 "clearly
less") when the stronger model was shown as Robot A, its negation when it was Robot B. So a positive mean
says the raters trusted the stronger model more, as in the Grad-CAM paper's Table (Selvaraju et al., ICCV
2017, section 5.2: +1.27 with Guided Grad-CAM, +1.00 with Guided Backpropagation, VGG-16 against AlexNet).

Per method: the mean score, a 95% bootstrap confidence interval of the mean (:func:`scipy.stats.bootstrap`,
percentile method, :data:`RESAMPLES` resamples, fixed seed :data:`BOOTSTRAP_SEED`, so the same ratings
always give the same interval), the number of ratings and of distinct raters. The bootstrap resamples
ratings as independent draws; it does not model that one rater gives several ratings (a rater-clustered
bootstrap would give wider intervals when raters differ systematically). With fewer than two ratings
there is no interval (null, with a note); when every score is equal the resamples have no spread, so the
interval is reported as [mean, mean] with a note saying so.

The CSV is safe to open in a spreadsheet (OWASP's advice on CSV injection): a text cell that a
spreadsheet would read as a formula, one starting with ``=``, ``+``, ``-``, ``@``, a tab or a carriage
return (an image named ``=HYPERLINK("http://x","y")``, a class ``@SUM(A1)``), gets a single quote in
front, so it is shown as the text it is; a number such as ``-1.5`` or ``-2`` stays a number, and the ids
the server makes (study, pair, rater: random URL-safe tokens or integers, which can start with ``-`` but
cannot call a function) stay as the API gives them, so the file can be joined with it. Every text cell
is quoted as well, so that a spreadsheet splitting the line at another separator (``;`` in some
locales, a tab) cannot start a new cell in the middle of a name.
"""

from __future__ import annotations

import csv
import inspect
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from gradcam.study.scale import ANSWERS
from gradcam.study.store import Rating, StudyRow

# SciPy >= 1.15 takes the generator as `rng` (and deprecates `random_state`); older ones as `random_state`.
_RNG = "rng" if "rng" in inspect.signature(stats.bootstrap).parameters else "random_state"

CONFIDENCE = 0.95
RESAMPLES = 9999
BOOTSTRAP_SEED = 0
#: The CSV's columns, one row per rating.
CSV_COLUMNS = (
    "study",
    "pair",
    "image",
    "class_index",
    "class",
    "method",
    "stronger_model",
    "weaker_model",
    "stronger_side",
    "rater",
    "answer",
    "score",
    "time",
)
#: Columns of ids the server makes: written as they are (see the module docstring).
_ID_COLUMNS = frozenset({"study", "pair", "rater"})
#: What a spreadsheet reads as the start of a formula (OWASP, CSV injection).
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
#: A plain decimal number (optionally signed, with an exponent): left as it is.
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


@dataclass(frozen=True)
class Interval:
    """A mean with its bootstrap interval; ``low``/``high`` are None when there is none (``note`` says
    why, as it does when the interval is degenerate)."""

    mean: float | None
    low: float | None
    high: float | None
    note: str | None


@dataclass(frozen=True)
class MethodResult:
    method: str
    pairs: int
    ratings: int
    raters: int
    interval: Interval
    #: Number of ratings per score from the stronger side, lowest first (every answer of the scale).
    counts: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class StudyResults:
    study: StudyRow
    methods: list[MethodResult]
    ratings: int
    raters: int


def mean_interval(
    scores: Sequence[float],
    *,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> Interval:
    """The mean of ``scores`` and its percentile-bootstrap confidence interval (module docstring)."""
    values = np.asarray(scores, dtype=np.float64)
    n = len(values)
    if n == 0:
        return Interval(None, None, None, "no ratings yet")
    mean = float(values.mean())
    if n == 1:
        return Interval(mean, None, None, "one rating: no confidence interval")
    if np.all(values == values[0]):
        return Interval(mean, mean, mean, f"all {n} scores are equal: the interval is the mean itself")
    result = stats.bootstrap(
        (values,),
        np.mean,
        n_resamples=resamples,
        confidence_level=confidence,
        method="percentile",
        vectorized=True,
        batch=500,  # resamples at a time: memory stays bounded however many ratings there are
        **{_RNG: np.random.default_rng(seed)},
    )
    low, high = result.confidence_interval
    return Interval(mean, float(low), float(high), None)


def summarise(study: StudyRow, ratings: Sequence[Rating], pairs_per_method: dict[str, int]) -> StudyResults:
    """Per-method results of ``study`` (in the study's method order) from its ``ratings``."""
    methods = []
    for method in study.methods:
        mine = [r for r in ratings if r.method == method]
        scores = [r.score for r in mine]
        methods.append(
            MethodResult(
                method=method,
                pairs=pairs_per_method.get(method, 0),
                ratings=len(mine),
                raters=len({r.rater for r in mine}),
                interval=mean_interval(scores),
                counts={score: scores.count(score) for score in sorted(ANSWERS)},
            )
        )
    return StudyResults(study, methods, len(ratings), len({r.rater for r in ratings}))


def results_dict(results: StudyResults) -> dict:
    """The results as JSON-ready data (the shape of the API's results response)."""
    study = results.study
    return {
        "study": study.id,
        "name": study.name,
        "stronger_model": study.stronger_model,
        "weaker_model": study.weaker_model,
        "confidence_level": CONFIDENCE,
        "resamples": RESAMPLES,
        "bootstrap_seed": BOOTSTRAP_SEED,
        "ratings": results.ratings,
        "raters": results.raters,
        "methods": [
            {
                "method": m.method,
                "pairs": m.pairs,
                "ratings": m.ratings,
                "raters": m.raters,
                "mean": m.interval.mean,
                "ci_low": m.interval.low,
                "ci_high": m.interval.high,
                "ci_note": m.interval.note,
                "counts": {str(score): n for score, n in m.counts.items()},
            }
            for m in results.methods
        ],
    }


def spreadsheet_safe(value: object) -> object:
    """``value`` as a CSV cell a spreadsheet shows as text: a string that starts like a formula and is
    not a number gets a leading single quote; numbers and every other value are left as they are."""
    if isinstance(value, str) and value.startswith(_FORMULA_STARTS) and not _NUMBER.fullmatch(value):
        return "'" + value
    return value


def ratings_csv(study: StudyRow, ratings: Sequence[Rating]) -> str:
    """The raw ratings as CSV text (:data:`CSV_COLUMNS`; time in ISO 8601 UTC), safe to open in a
    spreadsheet: text cells that would be read as formulas are escaped (module docstring)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n", quoting=csv.QUOTE_NONNUMERIC)
    writer.writerow(CSV_COLUMNS)
    for r in ratings:
        row = [
            r.study,
            r.pair,
            r.image,
            r.class_index,
            r.class_name,
            r.method,
            study.stronger_model,
            study.weaker_model,
            r.stronger_side,
            r.rater,
            r.answer,
            r.score,
            r.created.isoformat(timespec="seconds"),
        ]
        writer.writerow(
            [v if c in _ID_COLUMNS else spreadsheet_safe(v) for c, v in zip(CSV_COLUMNS, row, strict=True)]
        )
    return buffer.getvalue()
