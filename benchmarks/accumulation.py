"""Peak memory of batch B vs. batch B/k with k accumulation steps (same effective batch), and that they match.

    python -m benchmarks.accumulation [--batch 256] [--k 1 2 4 8] [--steps 4] [--repeats 2]

Each variant trains the demo ``DigitsCNN`` (64 channels) on digits for the same number of optimizer steps with the
same samples per step (batch ``B`` with no accumulation, or ``B/k`` micro-batches accumulated by
``AccumulationScheduler({0: k})``), inside ``torch.profiler`` with ``profile_memory=True``. What is measured: the
largest "Total Allocated" value of the profiler's CPU memory events, i.e. the peak of bytes held by PyTorch's CPU
allocator (tensors: weights, gradients, momentum buffers, activations) during ``trainer.fit``; not the process RSS
(Python objects, allocator caches and libraries are not in it). Steps stay inside the first epoch so that every
step sees ``B`` samples in both variants; the final weights of each variant are compared with the baseline's.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
import warnings
from typing import Any

import lightning as L
import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.runner import markdown_table, median, quiet_trainer, record, side_by_side
from lightning_techniques import AccumulationScheduler
from lightning_techniques.demo import DigitsCNN, DigitsDataModule


def peak_allocated(prof: Any) -> int:
    """Largest "Total Allocated" among the profiler's ``[memory]`` events (bytes)."""
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as fh:
            events = json.load(fh)["traceEvents"]
    finally:
        os.remove(path)
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]" and "args" in e]
    return int(max(totals)) if totals else 0


def run(batch: int, k: int, steps: int) -> dict[str, Any]:
    L.seed_everything(0, verbose=False)
    model = DigitsCNN(channels=64, optimizer="sgd")
    callbacks = [AccumulationScheduler({0: k})] if k > 1 else []
    trainer = quiet_trainer(max_steps=steps, limit_val_batches=0, callbacks=callbacks)
    datamodule = DigitsDataModule(batch_size=batch // k)
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer.fit(model, datamodule=datamodule)
    elapsed = time.perf_counter() - start
    assert trainer.global_step == steps
    return {
        "peak": peak_allocated(prof),
        "seconds": elapsed,
        "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    train_size = 1257  # digits train split (70 % of 1,797)
    if args.batch * args.steps > train_size:
        raise SystemExit(f"--batch x --steps must stay inside the first epoch ({train_size} samples)")
    variants = {f"k={k}": (lambda k=k: run(args.batch, k, args.steps)) for k in args.k}
    results = side_by_side(variants, repeats=args.repeats)
    base_key = f"k={args.k[0]}"
    base = results[base_key][0]
    rows = []
    for key, runs in results.items():
        k = int(key.split("=")[1])
        peak = median([r["peak"] for r in runs])
        diff = max(float((runs[0]["weights"][n] - base["weights"][n]).abs().max()) for n in base["weights"])
        rows.append({
            "accumulation k": k,
            "micro-batch": args.batch // k,
            "samples / step": args.batch,
            "peak allocated (MiB)": peak / 2**20,
            f"peak vs {base_key}": peak / median([r["peak"] for r in results[base_key]]),
            "s / optimizer step (under profiler)": median([r["seconds"] for r in runs]) / args.steps,
            "max abs weight diff vs k=1": diff,
        })
    body = (
        f"DigitsCNN (64 channels) on digits, SGD (momentum 0.9) lr 3e-3, {args.steps} optimizer steps of {args.batch} samples each, "
        f"median of {args.repeats} interleaved repeats. Peak = largest 'Total Allocated' of torch.profiler's CPU "
        "memory events during `trainer.fit` (PyTorch CPU allocator: weights, gradients, momentum buffers, activations; not "
        "process RSS). The weight difference shows that accumulating k micro-batches of B/k gives the same update as "
        "one batch of B (up to float32 rounding; SGD is used because Adam's m/sqrt(v) amplifies "
        "rounding-level differences of near-zero gradients). Times are measured under the profiler and only indicative.\n\n"
        + markdown_table(rows)
    )
    record("accumulation", "Gradient accumulation: peak memory of batch B vs. B/k with k accumulation steps", body)


if __name__ == "__main__":
    main()
