"""Attention maps of a Hugging Face model: keeping SDPA and capturing vs. switching to eager ``output_attentions``.

    python -m benchmarks.attention_hf [--repeats 5]

The demo's TinyBert (a ``transformers`` BERT, 2 layers, 4 heads) at a few sizes, one process, round-robin:

* forward time of one evaluation batch: SDPA (the model as trained), SDPA inside ``AttentionCapture`` (every layer
  captured: what ``AttentionMapLogger`` does on its one batch), and eager with ``output_attentions=True`` (what one
  would otherwise switch the model to);
* the cost of one ``AttentionMapLogger`` event (a ``validate`` call with the callback minus without it) vs. the epoch
  time on ``TokenPresenceDataModule``, and the overhead at the default frequency (every 5 validation epochs).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from typing import Any

import lightning as L
import torch

from benchmarks.runner import markdown_table, median, quiet_trainer, record, side_by_side
from lightning_techniques import AttentionMapLogger
from lightning_techniques.demo import TinyBert, TokenPresenceDataModule
from lightning_techniques.interpret.attention import AttentionCapture

SIZES = [(32, 64), (128, 128), (256, 256)]  # (hidden size, sequence length); batch 32


def forward_row(hidden: int, length: int, repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    sdpa = TinyBert(hidden_size=hidden, max_length=length, vocab_size=1000).eval()
    eager = TinyBert(hidden_size=hidden, max_length=length, vocab_size=1000, attn_implementation="eager").eval()
    eager.load_state_dict(sdpa.state_dict())
    ids = torch.randint(1, 1000, (32, length))
    ids[::2, length // 2 :] = 0  # half the batch padded to half length
    mask = (ids != 0).long()

    def timed(fn: Any) -> float:
        with torch.no_grad():
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start

    def captured() -> None:
        with AttentionCapture(sdpa):
            sdpa(ids)

    variants = {
        "sdpa": lambda: timed(lambda: sdpa(ids)),
        "sdpa + capture": lambda: timed(captured),
        "eager + output_attentions": lambda: timed(
            lambda: eager.model(input_ids=ids, attention_mask=mask, output_attentions=True)),
    }
    for fn in variants.values():  # warm-up
        fn()
    results = {k: median(v) for k, v in side_by_side(variants, repeats=repeats).items()}
    return {
        "hidden x length": f"{hidden} x {length}",
        "sdpa ms": 1e3 * results["sdpa"],
        "sdpa + capture ms": 1e3 * results["sdpa + capture"],
        "capture / sdpa": results["sdpa + capture"] / results["sdpa"],
        "eager + output_attentions ms": 1e3 * results["eager + output_attentions"],
        "eager / sdpa": results["eager + output_attentions"] / results["sdpa"],
    }


def logger_row(repeats: int) -> dict[str, Any]:
    dm = TokenPresenceDataModule()
    L.seed_everything(0, verbose=False)
    model = TinyBert()
    quiet_trainer(max_epochs=1).fit(model, datamodule=dm)  # warm-up, partly trained
    workdir = tempfile.TemporaryDirectory(prefix="lt_attention_hf_")

    def epoch() -> float:
        L.seed_everything(0, verbose=False)
        trainer = quiet_trainer(max_epochs=1)
        start = time.perf_counter()
        trainer.fit(TinyBert(), datamodule=dm)
        return time.perf_counter() - start

    def validate(callbacks: list[Any]) -> float:
        trainer = quiet_trainer(callbacks=callbacks, default_root_dir=workdir.name)
        start = time.perf_counter()
        trainer.validate(model, datamodule=dm, verbose=False)
        return time.perf_counter() - start

    results = side_by_side({
        "epoch": epoch,
        "bare validate": lambda: validate([]),
        "logger validate": lambda: validate([AttentionMapLogger()]),
    }, repeats=repeats)
    workdir.cleanup()
    epoch_time = median(results["epoch"])
    cost = max(0.0, median(results["logger validate"]) - median(results["bare validate"]))
    every = AttentionMapLogger().every_n_val_epochs
    return {"epoch s": epoch_time, "s per event": cost, "event / epoch": cost / epoch_time,
            "overhead at default (every 5 val epochs)": f"{100 * cost / (every * epoch_time):.1f}%"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    body = (
        "TinyBert (transformers BERT, 2 layers, 4 heads), batch 32 with half the sequences padded to half length, "
        f"1 torch thread, {args.repeats} round-robin repeats, medians. 'capture' = `AttentionCapture` on every layer "
        "(weights recomputed in float32 from the query/key/mask SDPA received); 'eager + output_attentions' = the "
        "same weights loaded into `attn_implementation=\"eager\"`.\n\n"
        + markdown_table([forward_row(h, n, args.repeats) for h, n in SIZES])
        + "\n\n`AttentionMapLogger` (defaults) on TinyBert / `TokenPresenceDataModule` (one epoch = 23 training steps of "
        "32 + validation on 154 sequences):\n\n"
        + markdown_table([logger_row(args.repeats)])
    )
    record("attention_hf", "Attention maps of a transformers model: SDPA + capture vs. eager output_attentions", body)


if __name__ == "__main__":
    main()
