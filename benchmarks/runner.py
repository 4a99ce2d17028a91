"""Side-by-side measurement helpers shared by every benchmark script (ARCHITECTURE.md section 6).

A benchmark runs the technique and its baseline in **one** process, interleaved (round-robin) so that machine
noise hits both alike, and reports ratios. Results are written into ``benchmarks/RESULTS.md`` between markers
``<!-- BEGIN name -->`` / ``<!-- END name -->`` by :func:`record`, with the machine, versions and date: numbers are
never edited by hand.

Run a benchmark from the repository root: ``python -m benchmarks.overhead``.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def machine_info() -> dict[str, str]:
    """Machine, core count, Python/torch/lightning versions, device and date, for the results header."""
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    return {
        "machine": f"{platform.machine()} {platform.processor() or platform.system()}",
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": L.__version__,
        "device": device,
        "date": _dt.date.today().isoformat(),
    }


class StepTimer(Callback):
    """Wall time of each training step, in seconds.

    ``times``: ``on_train_batch_start`` -> ``on_train_batch_end`` (forward, backward, optimizer step and the
    callbacks' batch hooks). ``intervals``: from one ``on_train_batch_end`` to the next, which also covers fetching
    the batch, moving it to the device and the batch transforms run in ``on_after_batch_transfer`` (the first step
    of each epoch has no interval).
    """

    def __init__(self) -> None:
        self.times: list[float] = []
        self.intervals: list[float] = []
        self._start = 0.0
        self._last_end: float | None = None

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._last_end = None

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        self.times.append(now - self._start)
        if self._last_end is not None:
            self.intervals.append(now - self._last_end)
        self._last_end = now


def side_by_side(variants: Mapping[str, Callable[[], Any]], repeats: int = 5) -> dict[str, list[Any]]:
    """Call every variant ``repeats`` times, round-robin with the starting variant rotated each round
    (A B C, B C A, C A B ...) so that no variant always runs in the same position of a round (drift within a round
    would otherwise show up as a fake overhead); a garbage collection precedes every call.
    Returns ``{name: [results]}``."""
    import gc

    names = list(variants)
    results: dict[str, list[Any]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            gc.collect()
            results[name].append(variants[name]())
    return results


class Lockstep:
    """Two fits in two threads of this process that take turns one training step at a time: a fit calls
    :meth:`hand_over` at the end of each of its training batches and waits there until the other fit has done its
    next one (a fit that has finished no longer waits for, or is waited for by, the other).

    The two members of a pair then run their steps interleaved ~10 ms apart, so a slow phase of a shared machine
    (another tenant's load, a frequency change) hits both alike, not just one whole run; combined with
    :func:`pin_to_one_cpu` they also share one core (on a 2-vCPU VM the two vCPUs can differ by several percent).
    Waiting costs no CPU time, so ``time.thread_time`` per step counts only a fit's own work."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._turn = 0
        self._done = [False, False]

    def _wait_for_turn(self, me: int) -> None:
        while self._turn != me and not self._done[1 - me]:
            self._cond.wait()

    def hand_over(self, me: int) -> None:
        """Called by fit ``me`` (0 or 1) at the end of a training batch: let the other fit run one, then return."""
        with self._cond:
            self._turn = 1 - me
            self._cond.notify_all()
            self._wait_for_turn(me)

    def run(self, first: Callable[[Lockstep, int], Any], second: Callable[[Lockstep, int], Any]) -> tuple[Any, Any]:
        """Run ``first(self, 0)`` and ``second(self, 1)`` in lockstep (``first`` starts); their results, in order.
        An exception in either is raised here (after both have ended)."""
        results: list[Any] = [None, None]
        errors: list[BaseException] = []

        def worker(me: int, fn: Callable[[Lockstep, int], Any]) -> None:
            with self._cond:
                self._wait_for_turn(me)
            try:
                results[me] = fn(self, me)
            except BaseException as error:  # re-raised in the calling thread
                errors.append(error)
            finally:
                with self._cond:
                    self._done[me] = True
                    self._turn = 1 - me
                    self._cond.notify_all()

        threads = [threading.Thread(target=worker, args=(i, fn)) for i, fn in enumerate((first, second))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return results[0], results[1]


def paired_in_lockstep(variants: Mapping[str, Callable[[Lockstep, int], Any]], baseline: str,
                       repeats: int = 5) -> dict[str, list[tuple[Any, Any]]]:
    """Call every variant but ``baseline`` ``repeats`` times, each call in :class:`Lockstep` with a call of
    ``baseline`` (their training steps interleaved one by one; the baseline starts first in even rounds, second in
    odd ones), the variants' order rotated each round; a garbage collection precedes every pair. Every call gets
    ``(lockstep, index)`` to hand to its step timer. A slow phase of a shared machine then slows both members of a
    pair alike, so the ratio within a pair is what the variant costs; the median over rounds discards the pairs a
    disturbance hit unevenly. Returns ``{name: [(variant result, its baseline result)]}``; the baseline's own entry
    pairs each baseline run with itself."""
    import gc

    names = [name for name in variants if name != baseline]
    results: dict[str, list[tuple[Any, Any]]] = {name: [] for name in variants}
    for round_index in range(repeats):
        shift = round_index % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            gc.collect()
            if round_index % 2 == 0:
                base, variant = Lockstep().run(variants[baseline], variants[name])
            else:
                variant, base = Lockstep().run(variants[name], variants[baseline])
            results[name].append((variant, base))
            results[baseline].append((base, base))
    return results


def pin_to_one_cpu() -> int | None:
    """Restrict this process (and the threads it starts) to one of the CPUs it may use, the lowest; returns it
    (None where the platform cannot pin)."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    return cpu


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def quiet_trainer(**kwargs: Any) -> L.Trainer:
    """A Trainer without logger, checkpoints, progress bar or summary (for measurements); files it might write
    (artefacts) go to a temporary directory, never into the repository."""
    base = dict(
        default_root_dir=tempfile.mkdtemp(prefix="lt-bench-"),
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    base.update(kwargs)
    return L.Trainer(**base)


def markdown_table(rows: list[Mapping[str, Any]]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c, "")
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def record(name: str, title: str, body: str, path: Path = RESULTS) -> None:
    """Replace (or append) the section ``name`` of RESULTS.md with ``title``, the machine header and ``body``."""
    info = machine_info()
    header = ", ".join(f"{k}: {v}" for k, v in info.items())
    section = f"<!-- BEGIN {name} -->\n## {title}\n\n_{header}_\n\n{body.strip()}\n<!-- END {name} -->"
    text = path.read_text() if path.exists() else "# Benchmark results\n\nWritten by the scripts in `benchmarks/`; never edited by hand.\n"
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    if begin in text and end in text:
        before = text[: text.index(begin)]
        after = text[text.index(end) + len(end):]
        text = before + section + after
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)
    print(section)
