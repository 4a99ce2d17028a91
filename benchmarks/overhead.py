"""Per-step overhead of the foundation callbacks vs. a bare Trainer on the demo CNN (digits), side by side.

    python -m benchmarks.overhead [--repeats 7]

Variants run round-robin in one process: bare, +EarlyStopping (restore best weights), +LSUVInit, +both. Reports the
median step interval (batch end to batch end: data, transfer, forward, backward, optimizer step and every callback
hook; the one-off LSUV first step excluded), the median fit wall
time (3 epochs incl. validation), and ratios to the bare Trainer. Target: < 2% per step.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings

import lightning as L
import torch

from benchmarks.runner import StepTimer, markdown_table, median, quiet_trainer, record, side_by_side
from lightning_techniques import EarlyStopping, LSUVInit
from lightning_techniques.demo import DigitsCNN, DigitsDataModule

VARIANTS = {
    "bare Trainer": lambda: [],
    "bare Trainer again (A/A noise control)": lambda: [],
    "+ EarlyStopping": lambda: [EarlyStopping(monitor="val_loss", patience=100)],
    "+ LSUVInit": lambda: [LSUVInit()],
    "+ both": lambda: [LSUVInit(), EarlyStopping(monitor="val_loss", patience=100)],
}


def run_once(make_callbacks, epochs: int) -> dict[str, float]:
    L.seed_everything(0, verbose=False)
    timer = StepTimer()
    trainer = quiet_trainer(max_epochs=epochs, callbacks=[timer] + make_callbacks())  # timer first: LSUV in step 1
    start = time.perf_counter()
    trainer.fit(DigitsCNN(), datamodule=DigitsDataModule())
    wall = time.perf_counter() - start
    return {"step": median(timer.intervals), "first_step": timer.times[0], "fit": wall}


def hook_time_per_step(make_callbacks, epochs: int) -> dict[str, float]:
    """Seconds per training step spent inside the techniques' own hooks, from Lightning's SimpleProfiler
    (``[Callback]<state_key>.<hook>`` actions): a direct measurement, free of run-to-run noise."""
    from lightning.pytorch.profilers import SimpleProfiler

    L.seed_everything(0, verbose=False)
    callbacks = make_callbacks()
    profiler = SimpleProfiler()
    trainer = quiet_trainer(max_epochs=epochs, callbacks=callbacks, profiler=profiler)
    trainer.fit(DigitsCNN(), datamodule=DigitsDataModule())
    keys = tuple(f"[Callback]{cb.state_key}." for cb in callbacks)
    total = first = 0.0
    for action, durations in profiler.recorded_durations.items():
        if action.startswith(keys):
            total += sum(durations)
            if action.endswith(".on_train_batch_start"):
                first += durations[0]  # LSUV's one-off initialisation happens here, on the first batch
    steps = max(1, trainer.global_step)
    return {"per_step": (total - first) / steps, "one_off": first}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    variants = {name: (lambda make=make: run_once(make, args.epochs)) for name, make in VARIANTS.items()}
    run_once(VARIANTS["bare Trainer"], 1)  # warm-up (imports, allocator)
    results = side_by_side(variants, repeats=args.repeats)
    base_step = median([r["step"] for r in results["bare Trainer"]])
    base_fit = median([r["fit"] for r in results["bare Trainer"]])
    rows = []
    for name, runs in results.items():
        step = median([r["step"] for r in runs])
        fit = median([r["fit"] for r in runs])
        hooks = hook_time_per_step(VARIANTS[name], args.epochs)
        rows.append({
            "variant": name,
            "technique hooks per step (ms)": hooks["per_step"] * 1e3,
            "hooks / bare step": hooks["per_step"] / base_step,
            "one-off at first batch (ms)": hooks["one_off"] * 1e3,
        })
        rows[-1].update({
            "variant": name,
            "median step (ms)": step * 1e3,
            "step ratio": step / base_step,
            "first step (ms)": median([r["first_step"] for r in runs]) * 1e3,
            f"fit {args.epochs} epochs (s)": fit,
            "fit ratio": fit / base_fit,
        })
    body = (
        f"DigitsCNN on digits, batch 64, {args.epochs} epochs (60 steps + validation each epoch), "
        f"{args.repeats} round-robin repeats, 1 torch thread; medians. The first step includes LSUV's one-off "
        "initialisation; EarlyStopping acts only at validation end (its cost is in the fit time). The A/A row runs "
        "the bare Trainer twice: its distance from 1 is the measurement noise of this machine. 'Technique hooks per "
        "step' is the time Lightning's SimpleProfiler records inside the techniques' own hooks (all of them, "
        "validation-end snapshots included, the first-batch LSUV initialisation counted separately), divided by the "
        "number of steps: the overhead itself, without timing noise.\n\n"
        + markdown_table(rows)
    )
    record("overhead", "Per-step overhead of EarlyStopping and LSUVInit vs. a bare Trainer", body)


if __name__ == "__main__":
    main()
