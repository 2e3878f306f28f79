"""The measurement protocol of the benchmarks that time calls next to plain inference, stated once.

Not a benchmark itself: ``overhead.py``, ``transformer_overhead.py``, ``score_ablation.py`` and
``all_classes.py`` import it as ``import timing`` (a script's own folder is on ``sys.path``).

The protocol:

* What is timed: a *contender*, one callable doing a whole job (a forward, a whole Grad-CAM call, ...).
  The first contender of a list is the *baseline*, in these benchmarks ``model(x)`` under
  ``torch.inference_mode()``, the cheapest way to run the model.
* How one call is timed (:func:`timed`): the wall-clock time (``time.perf_counter``) of the call, with
  garbage collection paused for its duration and, on CUDA, the device synchronised before and after it,
  so that the kernels the call queued are counted and none of an earlier call's are.
* Warm-up (:func:`warm_up`): one untimed inference and ``--warmup`` untimed rounds first (a process's
  first forwards pay one-off kernel and allocator set-up that has nothing to do with what is measured).
  A contender whose cold first call is a figure of its own (the automatic layer search) is left out of
  those rounds, its first call timed once after the others have warmed the process up, and it is then
  warmed up too.
* Rounds (:func:`run_rounds`): each of ``--rounds`` rounds, after a garbage collection, calls every
  contender once, in an order rotated from round to round, so that the machine's noise (other processes,
  frequency changes) and position effects hit all contenders alike instead of landing on whichever ran
  during a busy spell. On a busy machine the rounds stop early once the run has taken ``--budget``
  seconds (0: no limit), and say so.
* Report (:func:`print_table`): per contender the median and minimum time, the ratio of its median to
  the baseline's median, and the median (with quartiles) of its per-round ratios, each round's time
  divided by the baseline's time in the same round. Pairing calls of the same round cancels slow drift
  of the machine's speed; the quartiles show how much the machine's noise moves the figure. Calls timed
  once (a cold first call) follow on lines of their own, with their ratio to the baseline's median.

:func:`measure` runs warm-up, rounds and report in turn; :func:`print_closing` prints the last lines;
:func:`gradcam_overhead` is the whole run of ``overhead.py`` and ``transformer_overhead.py``.

Nothing is asserted anywhere: these are measurements, not tests.

The shared command-line options: :func:`add_shape_options` (``--rounds``, ``--warmup``, ``--batch``,
``--size``) and :func:`add_run_options` (``--threads``, ``--device``, ``--seed``, ``--budget``), checked
by :func:`check_options` and applied by :func:`prepare`.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

import gradcam

# Per unit of the report: the factor from seconds, the width of the median column and the decimals.
UNITS = {"s": (1.0, 9, 4), "ms": (1e3, 10, 1)}
NAME_WIDTH = 32


@dataclass
class Contender:
    """One timed callable and the times it took, one per round (``note``: how, where not by rounds)."""

    name: str
    call: Callable[[], object]
    times: list[float] = field(default_factory=list)
    note: str = ""


def timed(call: Callable[[], object], device: torch.device | None = None) -> float:
    """Seconds one call takes, with garbage collection paused and a CUDA device synchronised."""
    cuda = device is not None and device.type == "cuda"
    enabled = gc.isenabled()
    gc.disable()
    try:
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        call()
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - start
    finally:
        if enabled:
            gc.enable()


def quartiles(values: list[float]) -> tuple[float, float]:
    """First and third quartile; both equal the value itself for a single value."""
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def add_shape_options(
    parser: argparse.ArgumentParser, *, rounds: int | None = None, warmup: int | None = None, batch: int
) -> None:
    """``--rounds`` and ``--warmup`` (where given a default; None: the script has none or its own),
    ``--batch`` and ``--size``."""
    if rounds is not None:
        parser.add_argument("--rounds", type=int, default=rounds, help=f"timed rounds (default {rounds})")
    if warmup is not None:
        help_text = f"untimed warm-up rounds (default {warmup})"
        parser.add_argument("--warmup", type=int, default=warmup, help=help_text)
    parser.add_argument("--batch", type=int, default=batch, help=f"images per batch (default {batch})")
    parser.add_argument("--size", type=int, default=224, help="input height and width (default 224)")


def add_run_options(
    parser: argparse.ArgumentParser, *, device: bool = False, budget: float | None = None
) -> None:
    """``--threads``, ``--device`` (if ``device``), ``--seed`` and ``--budget`` (if given a default)."""
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default torch's)")
    if device:
        parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and inputs (default 0)")
    if budget is not None:
        parser.add_argument(
            "--budget",
            type=float,
            default=budget,
            help=f"end the timed rounds once the run has taken this many seconds, 0: no limit "
            f"(default {budget:.0f})",
        )


def check_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """``args`` once ``--rounds``, ``--batch`` (>= 1), ``--warmup`` and ``--budget`` (>= 0) are valid;
    a usage error otherwise."""
    if args.rounds < 1 or args.warmup < 0 or args.batch < 1:
        parser.error("--rounds and --batch must be >= 1, --warmup >= 0")
    if getattr(args, "budget", 0) < 0:
        parser.error("--budget must be >= 0 (0: no limit)")
    return args


def prepare(args: argparse.Namespace) -> torch.device:
    """Apply ``--threads`` and ``--seed``; the device of ``--device`` (the CPU where there is none)."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return torch.device(getattr(args, "device", "cpu"))


def machine(device: torch.device) -> str:
    """The device, the CPU cores, torch's version and threads, for a benchmark's first line."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
    return (
        f"{device.type.upper()} ({name}, {os.cpu_count()} cores), torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}"
    )


def named_module(model: nn.Module, name: str, model_name: str) -> nn.Module:
    """The submodule of ``--layer``; exits with a one-line message where the model has none of that name."""
    module = dict(model.named_modules()).get(name)
    if module is None:
        raise SystemExit(f"model {model_name} has no module named '{name}'; pass --layer")
    return module


def inference(model: nn.Module, x: torch.Tensor) -> Contender:
    """The baseline: ``model(x)`` under ``torch.inference_mode()``, the cheapest way to run the model."""

    def call() -> object:
        with torch.inference_mode():
            return model(x)

    return Contender("inference_mode forward", call)


def warm_up(
    contenders: Sequence[Contender],
    rounds: int,
    device: torch.device | None = None,
    cold: Contender | None = None,
) -> float | None:
    """One untimed call of the baseline (the first contender), then ``rounds`` (at least one) untimed
    rounds of every contender but ``cold``; then ``cold``'s first call, timed, and ``rounds`` more calls
    of it. Returns the seconds of that first call (None without ``cold``)."""
    timed(contenders[0].call, device)
    for _ in range(max(rounds, 1)):
        for contender in contenders:
            if contender is not cold:
                contender.call()
    if cold is None:
        return None
    first = timed(cold.call, device)
    for _ in range(rounds):
        cold.call()
    return first


def run_rounds(
    contenders: Sequence[Contender],
    rounds: int,
    device: torch.device | None = None,
    *,
    started: float | None = None,
    budget: float = 0.0,
    after_round: Callable[[int], object] | None = None,
) -> int:
    """Time ``rounds`` rounds of every contender, in an order rotated from round to round, appending to
    their ``times``; ``after_round(index)`` after each round. Once ``budget`` seconds (0: no limit) have
    passed since ``started`` (a ``time.perf_counter()`` reading) the rounds stop early, with a note.
    Returns the rounds timed."""
    for round_index in range(rounds):
        gc.collect()
        shift = round_index % len(contenders)
        for contender in [*contenders[shift:], *contenders[:shift]]:
            contender.times.append(timed(contender.call, device))
        if after_round is not None:
            after_round(round_index)
        done = round_index + 1
        if budget and started is not None and time.perf_counter() - started > budget and done < rounds:
            print(f"time budget of {budget:.0f} s spent: stopped after {done} rounds (busy machine?)")
            return done
    return rounds


def measure(
    contenders: Sequence[Contender],
    args: argparse.Namespace,
    device: torch.device | None = None,
    *,
    started: float,
    unit: str = "s",
    cold: Contender | None = None,
) -> float:
    """The whole protocol: :func:`warm_up` (``--warmup``; ``cold``'s first call timed), :func:`run_rounds`
    (``--rounds``, ``--budget``) and :func:`print_table`, the cold first call on a line of its own.
    Returns the baseline's median."""
    first = warm_up(contenders, args.warmup, device, cold=cold)
    run_rounds(contenders, args.rounds, device, started=started, budget=args.budget)
    once = [] if cold is None or first is None else [(f"{cold.name}, 1st call", first)]
    return print_table(contenders, unit, once=once)


def print_closing(
    contenders: Sequence[Contender], started: float, headline: Contender, label: str, target: float
) -> None:
    """The last lines: the rounds timed and the run's duration, then ``headline``'s ratio to the baseline
    (the first contender) against ``target``: the median of the per-round ratios, which a busy machine
    disturbs less than the ratio of the two medians (each round times both back to back)."""
    baseline = contenders[0]
    print(f"{len(baseline.times)} timed rounds, whole run {time.perf_counter() - started:.0f} s")
    ratios = [t / b for t, b in zip(headline.times, baseline.times, strict=True)]
    medians = statistics.median(headline.times) / statistics.median(baseline.times)
    print(
        f"{label} ratio: {statistics.median(ratios):.2f} per round (median; ratio of medians {medians:.2f}), "
        f"target <= {target:.2f}"
    )


def print_table(
    contenders: Sequence[Contender], unit: str = "s", once: Sequence[tuple[str, float]] = ()
) -> float:
    """The report: per contender its median and minimum time (in ``unit``, "s" or "ms"), the ratio of its
    median to the baseline's (the first contender's) and the median [q1, q3] of its per-round ratios to
    the baseline; then a line for each (name, seconds) of ``once``. Returns the baseline's median."""
    scale, width, decimals = UNITS[unit]
    baseline = contenders[0]
    base_median = statistics.median(baseline.times)
    header = (
        f"{'':{NAME_WIDTH}} {'median ' + unit:>{width}} {'min ' + unit:>8} {'ratio of medians':>17} "
        f"{'per-round ratio [q1, q3]':>26}"
    )
    print(header)
    print("-" * len(header))
    for contender in contenders:
        median = statistics.median(contender.times)
        ratios = [t / b for t, b in zip(contender.times, baseline.times, strict=True)]
        q1, q3 = quartiles(ratios)
        per_round = f"{statistics.median(ratios):.3f} [{q1:.3f}, {q3:.3f}]"
        print(
            f"{contender.name:{NAME_WIDTH}} {median * scale:{width}.{decimals}f} "
            f"{min(contender.times) * scale:8.{decimals}f} {median / base_median:17.3f} {per_round:>26}"
        )
    for name, seconds in once:
        ratio = seconds / base_median
        print(f"{name:{NAME_WIDTH}} {seconds * scale:{width}.{decimals}f} {'':8} {ratio:17.3f}")
    return base_median


def gradcam_overhead(
    args: argparse.Namespace,
    model: nn.Module,
    x: torch.Tensor,
    device: torch.device,
    started: float,
    *,
    others: Callable[[nn.Module, nn.Module, torch.Tensor], Sequence[Contender]],
    check: Callable[[nn.Module, str, nn.Module, torch.Tensor], str],
    target: float,
    unit: str = "s",
) -> None:
    """An overhead benchmark's run after its set-up: the first line (model, batch, machine, rounds);
    the baseline, ``gradcam.GradCAM(model)`` (automatic layer, its cold first call timed on its own, as
    it includes the layer search), ``gradcam.GradCAM(model, args.layer)`` and the contenders
    ``others(model, layer, x)`` returns, measured and reported in ``unit``; then the automatic layer, the
    line ``check(model, args.layer, layer, x)`` returns and the closing lines, the automatic GradCAM's
    ratio of medians against ``target``."""
    layer = named_module(model, args.layer, args.model)
    print(
        f"{args.model} (random weights), batch {args.batch}x3x{args.size}x{args.size}, "
        f"{machine(device)}, {args.rounds} rounds after {args.warmup} warm-up"
    )
    auto_cam = gradcam.GradCAM(model)
    explicit_cam = gradcam.GradCAM(model, args.layer)
    auto = Contender("gradcam layer=None", lambda: auto_cam(x))
    contenders = [
        inference(model, x),
        auto,
        Contender(f"gradcam layer={args.layer!r}", lambda: explicit_cam(x)),
        *others(model, layer, x),
    ]
    measure(contenders, args, device, started=started, unit=unit, cold=auto)
    print(f"automatic layer: {auto_cam(x).layer}")
    print(check(model, args.layer, layer, x))
    print_closing(contenders, started, auto, "gradcam/inference", target)
