"""Parameter-efficient fine-tuning vs. full fine-tuning on two two-stage tasks (no download), side by side.

    python -m benchmarks.finetune [--seeds 3] [--pretrain-steps 300] [--steps 150] [--no-record]

The story:

* **digits**: the demo MLP (``DeepMLP(depth=3, width=128)``: Linear 64->128, Linear 128->128, head) pre-trained on
  digits 0-4 (``DigitsDataModule(classes=[0, 1, 2, 3, 4])``), then fine-tuned on digits 5-9 (labels remapped to
  0-4). The pre-trained weights are copied into a fresh module and its head (``net.5``) is re-initialised: the new
  classes get a fresh head, which trains in every method (``train_also``); the methods differ in how the two hidden
  layers adapt.
* **sequences**: a tiny Hugging Face BERT built from a config (``TinyBert``, random init, no download) pre-trained to
  detect whether any of tokens 7, 11, 13 occurs in a random token sequence (:class:`AnyOfTokensDataModule`), then
  adapted to detect token 11 alone, 7 and 13 now being distractors (``TokenPresenceDataModule(target_token=11)``).
  The head (pooler + classifier) is kept (same label meaning) and trains in every method (prompt tuning: peft trains
  the classifier). A second task that needs a token the pre-trained model ignores (pre-training on token 7 alone,
  then token 11) was learnt by full fine-tuning (0.92 after 150 steps) but not with the embeddings frozen: LoRA,
  ReLoRA, AdaLoRA and Adapters stayed at chance (LoRA also on every linear layer for 300 steps), prompt tuning 0.60.

Reference rows: ``head only`` (digits: a linear probe, the hidden layers frozen) and ``pre-trained, not fine-tuned``
(sequences: task 1's model evaluated on task 2 as it is). Every method starts from the same pre-trained weights, the
same data order and the same optimizer (the module's Adam; one learning rate for full fine-tuning and a higher one for
the parameter-efficient methods, per story: ``LR``), within one seed round-robin (benchmarks/runner.py
``side_by_side``). Measured:

* ``trainable``: parameters that reach the optimizer, as a fraction of the pre-trained model's parameters;
* ``train-state bytes``: bytes of the module's parameters + their gradients + the optimizer's state, summed over the
  real tensors after the last step (on CPU there is no allocator peak to read; bitsandbytes' quantisation state of
  4-bit weights is counted with the parameters). ``GPU peak`` (``torch.cuda.max_memory_allocated``) only with CUDA;
* ``adapted-layer base bytes``: the bytes of the base weights of the adapted layers (QLoRA: 4-bit NF4 + its
  quantisation state) beside the same weights in fp32;
* ``step CPU ms``: median main-thread CPU time (``time.thread_time``) of a training step;
* ``test acc``: accuracy on the second task's test split after fine-tuning (mean and min-max over seeds).

Methods whose class has not landed in ``lightning_techniques.finetune`` are skipped and listed as missing.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from benchmarks.runner import markdown_table, quiet_trainer, record, side_by_side
from lightning_techniques.demo import DeepMLP, DigitsDataModule, TinyBert, TokenPresenceDataModule

# Adam learning rates: full fine-tuning (and the head-only probe) / the parameter-efficient methods, which train
# few, freshly initialised parameters and are usually run at a higher rate than full fine-tuning
LR = {"digits": (3e-3, 1e-2), "sequences": (1e-3, 5e-3)}
DIGITS_HIDDEN = ["net.1", "net.3"]
BERT_ATTN = r"model\.bert\.encoder\.layer\.\d+\.attention\.self\.(query|value)"
BERT_LINEAR = r"model\.bert\.encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"
BERT_HEAD = ["model.bert.pooler", "model.classifier"]  # BERT's head: pooler (dense + tanh on token 0) + classifier
BERT_SUBLAYER_OUT = r"model\.bert\.encoder\.layer\.\d+\.(attention\.output|output)\.dense"


def technique(name: str) -> type | None:
    """The class ``name`` from ``lightning_techniques.finetune`` (or its module), ``None`` if it has not landed."""
    package = importlib.import_module("lightning_techniques.finetune")
    if hasattr(package, name):
        return getattr(package, name)
    module = {"LoRA": "lora", "QLoRA": "qlora", "ReLoRA": "relora", "AdaLoRA": "adalora", "Adapters": "adapters",
              "PromptTuning": "prompt", "PrefixTuning": "prompt"}[name]
    try:
        return getattr(importlib.import_module(f"lightning_techniques.finetune.{module}"), name, None)
    except ImportError:
        return None


# method -> (class name or None for a plain run, {story: kwargs factory(steps)})
Factory = Callable[[int], dict[str, Any]]
METHODS: dict[str, tuple[str | None, dict[str, Factory]]] = {
    "pre-trained, not fine-tuned": (None, {"sequences": lambda s: {}}),
    "full fine-tuning": (None, {"digits": lambda s: {}, "sequences": lambda s: {}}),
    "head only": (None, {"digits": lambda s: {}}),
    "LoRA r=4": ("LoRA", {
        "digits": lambda s: {"targets": DIGITS_HIDDEN, "rank": 4, "alpha": 8.0, "train_also": ["net.5"]},
        "sequences": lambda s: {"targets": [BERT_ATTN], "rank": 4, "alpha": 8.0, "train_also": BERT_HEAD},
    }),
    "QLoRA r=4 (NF4)": ("QLoRA", {
        "digits": lambda s: {"targets": DIGITS_HIDDEN, "rank": 4, "alpha": 8.0, "train_also": ["net.5"]},
        "sequences": lambda s: {"targets": [BERT_ATTN], "rank": 4, "alpha": 8.0, "train_also": BERT_HEAD},
    }),
    "ReLoRA r=4": ("ReLoRA", {
        "digits": lambda s: {"targets": DIGITS_HIDDEN, "r": 4, "alpha": 8.0, "restart_every": max(1, s // 3),
                             "rewarm_steps": max(0, min(5, s // 3 - 1)), "train_also": ["net.5"]},
        "sequences": lambda s: {"targets": [BERT_ATTN], "r": 4, "alpha": 8.0, "restart_every": max(1, s // 3),
                                "rewarm_steps": max(0, min(5, s // 3 - 1)), "train_also": BERT_HEAD},
    }),
    "AdaLoRA r 8->4": ("AdaLoRA", {
        "digits": lambda s: {"targets": DIGITS_HIDDEN, "init_r": 8, "target_r": 4, "alpha": 8.0, "tinit": s // 10,
                             "tfinal": s // 5, "delta_t": 5, "total_steps": s, "train_also": ["net.5"],
                             "log": False},
        "sequences": lambda s: {"targets": [BERT_ATTN], "init_r": 8, "target_r": 4, "alpha": 8.0, "tinit": s // 10,
                                "tfinal": s // 5, "delta_t": 5, "total_steps": s,
                                "train_also": BERT_HEAD, "log": False},
    }),
    "Adapters b=8": ("Adapters", {
        "digits": lambda s: {"targets": DIGITS_HIDDEN, "bottleneck": 8, "train_also": ["net.5"]},
        "sequences": lambda s: {"targets": [BERT_SUBLAYER_OUT], "bottleneck": 8,
                                "train_also": BERT_HEAD},
    }),
    "PromptTuning 8 tokens": ("PromptTuning", {"sequences": lambda s: {"num_tokens": 8}}),
    "PrefixTuning 8 tokens": ("PrefixTuning", {"sequences": lambda s: {"num_tokens": 8}}),
}


class Measure(Callback):
    """What reaches the optimizer (at train start), the bytes of parameters + gradients + optimizer state (after the
    last step), the main-thread CPU time of each step, and the test accuracy is read by the caller."""

    def __init__(self) -> None:
        self.trainable = 0
        self.step_cpu: list[float] = []
        self.param_bytes = self.grad_bytes = self.optim_bytes = 0
        self._t0 = 0.0

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        seen: set[int] = set()
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.requires_grad and id(p) not in seen:
                        seen.add(id(p))
                        self.trainable += p.numel()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._t0 = time.thread_time()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.step_cpu.append(time.thread_time() - self._t0)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.param_bytes = module_bytes(pl_module)
        self.grad_bytes = sum(t_bytes(p.grad) for p in pl_module.parameters() if p.grad is not None)
        self.optim_bytes = sum(
            t_bytes(v) for opt in trainer.optimizers for state in opt.state.values() for v in state.values()
            if torch.is_tensor(v)
        )


def t_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def quant_state_bytes(weight: Any) -> int:
    """Bytes of a bitsandbytes 4-bit weight's quantisation state (absmax, code; nested state with double
    quantisation); 0 for an ordinary tensor."""
    state = getattr(weight, "quant_state", None)
    total = 0
    while state is not None:
        for name in ("absmax", "code", "offset"):
            value = getattr(state, name, None)
            if torch.is_tensor(value):
                total += t_bytes(value)
        state = getattr(state, "state2", None)
    return total


def module_bytes(module: torch.nn.Module) -> int:
    return sum(t_bytes(p) + quant_state_bytes(p) for p in module.parameters())


def adapted_base_bytes(module: torch.nn.Module, paths: tuple[str, ...]) -> tuple[int, int]:
    """(bytes as stored, bytes in fp32) of the base weights of the layers at ``paths`` (LoRA-style wrappers: their
    ``base_layer``)."""
    stored = fp32 = 0
    for path in paths:
        layer = module.get_submodule(path)
        base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
        weight = getattr(base, "weight", None)
        if weight is None:
            continue
        stored += t_bytes(weight) + quant_state_bytes(weight)
        out_f, in_f = getattr(base, "out_features", None), getattr(base, "in_features", None)
        fp32 += 4 * (out_f * in_f if out_f and in_f else weight.numel())
    return stored, fp32


# ---------------------------------------------------------------------------------------------------------- stories

def digits_model(lr: float = 3e-3) -> DeepMLP:
    return DeepMLP(depth=3, width=128, num_classes=5, optimizer="adam", lr=lr)


def bert_model(lr: float = 1e-3) -> TinyBert:
    return TinyBert(max_length=20, lr=lr)  # positions for 12 tokens + 8 virtual tokens of prompt tuning


class AnyOfTokensDataModule(TokenPresenceDataModule):
    """Task 1 of the sequence story: the label is 1 when any of ``targets`` occurs (one of them, drawn at random, is
    placed in about half the sequences; the others hold none of them)."""

    def __init__(self, targets: tuple[int, ...] = (7, 11, 13), **kwargs: Any) -> None:
        super().__init__(target_token=targets[0], **kwargs)
        self.targets = list(targets)

    def _load(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed + 1)
        n, length = self.n_samples, self.max_length
        others = torch.tensor([t for t in range(1, self.vocab_size) if t not in self.targets])
        ids = others[torch.randint(len(others), (n, length), generator=g)]
        lengths = torch.randint(self.min_length, length + 1, (n,), generator=g)
        labels = (torch.rand(n, generator=g) < 0.5).long()
        where = (torch.rand(n, generator=g) * lengths).long()
        which = torch.tensor(self.targets)[torch.randint(len(self.targets), (n,), generator=g)]
        positive = labels.bool()
        ids[positive, where[positive]] = which[positive]
        return ids * (torch.arange(length)[None, :] < lengths[:, None]), labels


STORIES: dict[str, dict[str, Callable[..., Any]]] = {
    "digits": {
        "model": digits_model,
        "first": lambda seed: DigitsDataModule(classes=[0, 1, 2, 3, 4], seed=seed),
        "second": lambda seed: DigitsDataModule(classes=[5, 6, 7, 8, 9], seed=seed),
    },
    "sequences": {
        "model": bert_model,
        "first": lambda seed: AnyOfTokensDataModule(targets=(7, 11, 13), seed=seed),
        "second": lambda seed: TokenPresenceDataModule(target_token=11, seed=seed),
    },
}


def pretrain(story: str, seed: int, steps: int) -> dict[str, torch.Tensor]:
    L.seed_everything(seed, verbose=False)
    model = STORIES[story]["model"](LR[story][0])
    quiet_trainer(max_steps=steps, limit_val_batches=0).fit(model, datamodule=STORIES[story]["first"](seed))
    return {k: v.clone() for k, v in model.state_dict().items()}


def start_from(story: str, weights: dict[str, torch.Tensor], seed: int, lr: float) -> Any:
    L.seed_everything(seed, verbose=False)
    model = STORIES[story]["model"](lr)
    model.load_state_dict(weights)
    if story == "digits":  # a fresh head for the new classes (seeded: the same for every method)
        torch.manual_seed(seed + 1000)
        model.net[5].reset_parameters()
    return model


def finetune(story: str, method: str, weights: dict[str, torch.Tensor], seed: int, steps: int) -> dict[str, Any]:
    class_name, factories = METHODS[method]
    model = start_from(story, weights, seed, LR[story][0 if class_name is None else 1])
    base_params = sum(p.numel() for p in model.parameters())
    callbacks: list[Any] = []
    if class_name is not None:
        cls = technique(class_name)
        assert cls is not None
        callbacks.append(cls(**factories[story](steps)))
    if method == "head only":  # a linear probe: the module's Adam skips parameters without gradients
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("net.5."))
    measure = Measure()
    L.seed_everything(seed, verbose=False)
    datamodule = STORIES[story]["second"](seed)
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    if method == "pre-trained, not fine-tuned":  # the reference: what task 1's model already gets right on task 2
        measure.param_bytes = module_bytes(model)
        measure.step_cpu = [float("nan")]
    else:
        trainer = quiet_trainer(max_steps=steps, limit_val_batches=0, accelerator=accelerator,
                                callbacks=callbacks + [measure])
        trainer.fit(model, datamodule=datamodule)
    gpu_peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    (test,) = quiet_trainer(accelerator=accelerator).test(model, datamodule=datamodule, verbose=False)
    paths = tuple(getattr(callbacks[0], "changed_paths", ())) if callbacks else ()
    stored, fp32 = adapted_base_bytes(model, paths) if class_name in ("LoRA", "QLoRA", "ReLoRA", "AdaLoRA") else (0, 0)
    return {
        "acc": float(test["test_acc"]),
        "trainable": measure.trainable / base_params,
        "trainable_n": measure.trainable,
        "state_bytes": measure.param_bytes + measure.grad_bytes + measure.optim_bytes,
        "param_bytes": measure.param_bytes,
        "base_stored": stored,
        "base_fp32": fp32,
        "step_ms": 1e3 * statistics.median(measure.step_cpu[5:] or measure.step_cpu),  # nan without training
        "gpu_peak": gpu_peak,
    }


def available(story: str) -> tuple[list[str], list[str]]:
    present, missing = [], []
    for method, (class_name, factories) in METHODS.items():
        if story not in factories:
            continue
        (present if class_name is None or technique(class_name) is not None else missing).append(method)
    return present, missing


def run_story(story: str, seeds: int, pretrain_steps: int,
              steps: int) -> tuple[list[dict[str, Any]], list[str], dict[str, str], list[str]]:
    present, missing = available(story)
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in present}
    failed: dict[str, str] = {}
    for seed in range(seeds):
        weights = pretrain(story, seed, pretrain_steps)

        def variant(method: str, s: int = seed, w: dict = weights) -> dict[str, Any] | None:
            if method in failed:
                return None
            try:
                return finetune(story, method, w, s, steps)
            except Exception as exc:  # a method refused on this model: reported, not hidden
                message = " ".join(str(exc).split()).replace("`", "'")
                failed[method] = f"{type(exc).__name__}: {message[:300]}" + ("..." if len(message) > 300 else "")
                return None

        out = side_by_side({m: (lambda m=m: variant(m)) for m in present}, repeats=1)
        for method, values in out.items():
            results[method] += [v for v in values if v is not None]
        print(f"[{story}] seed {seed} done", flush=True)
    rows = []
    notes: list[str] = []
    reference = results.get("pre-trained, not fine-tuned")
    if reference:
        ref_acc = statistics.mean(r["acc"] for r in reference)
        stuck = [m for m in present if m != "pre-trained, not fine-tuned" and results[m]
                 and abs(statistics.mean(r["acc"] for r in results[m]) - ref_acc) < 0.01]
        notes.append(f"The pre-trained model already scores {ref_acc:.3f} on task 2 without fine-tuning"
                     + (f"; {', '.join(stuck)} stayed within 0.01 of it (did not adapt in {steps} steps)."
                        if stuck else "."))
    for method in ("QLoRA r=4 (NF4)",):
        runs = results.get(method) or []
        if runs and runs[0]["base_fp32"]:
            notes.append(f"QLoRA's adapted base weights: {runs[0]['base_stored']:,} bytes as stored (NF4 codes, "
                         f"absmax, nested statistics, code books) vs {runs[0]['base_fp32']:,} in fp32 = "
                         f"{runs[0]['base_stored'] / runs[0]['base_fp32']:.2f} (goal <= 1/6 = 0.167; on small "
                         "layers the fixed per-layer quantisation state weighs more).")
    for method in present:
        runs = results[method]
        if not runs:
            continue
        accs = [r["acc"] for r in runs]
        first = runs[0]
        row: dict[str, Any] = {
            "method": method,
            "trainable params": f"{first['trainable_n']:,} ({100 * first['trainable']:.1f} %)",
            "train-state KiB": f"{first['state_bytes'] / 1024:.0f}",
            "adapted-layer base KiB (fp32)": (f"{first['base_stored'] / 1024:.1f} ({first['base_fp32'] / 1024:.1f})"
                                              if first["base_fp32"] else "-"),
            "step CPU ms": (f"{statistics.median(r['step_ms'] for r in runs):.1f}"
                            if first["step_ms"] == first["step_ms"] else "-"),
            "test acc (task 2)": f"{statistics.mean(accs):.3f} [{min(accs):.3f}-{max(accs):.3f}]",
        }
        if first["gpu_peak"] is not None:
            row["GPU peak MiB"] = f"{first['gpu_peak'] / 2**20:.1f}"
        rows.append(row)
    return rows, missing, failed, notes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--stories", nargs="+", default=list(STORIES), choices=list(STORIES))
    parser.add_argument("--no-record", action="store_true", help="print the tables, leave RESULTS.md alone")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    try:
        import bitsandbytes
        import peft
        import transformers
        versions = f"peft {peft.__version__}, bitsandbytes {bitsandbytes.__version__}, transformers {transformers.__version__}"
    except ImportError as exc:  # pragma: no cover - the finetune extra
        versions = f"finetune extra incomplete ({exc})"
    body = [
        f"`python -m benchmarks.finetune --seeds {args.seeds} --pretrain-steps {args.pretrain_steps} --steps "
        f"{args.steps}` ({versions}; one torch thread). Pre-train on task 1 for {args.pretrain_steps} steps, then "
        f"fine-tune on task 2 for {args.steps} steps from the same weights and data order, with the module's Adam "
        f"(learning rate full fine-tuning / parameter-efficient methods: digits {LR['digits'][0]} / {LR['digits'][1]}, "
        f"sequences {LR['sequences'][0]} / {LR['sequences'][1]}); methods round-robin within each of {args.seeds} seeds. `trainable params`: what reaches the "
        "optimizer, as a share of the pre-trained model's parameters. `train-state KiB`: bytes of the module's "
        "parameters + gradients + optimizer state summed over the real tensors after the last step (CPU: no "
        "allocator peak to read; 4-bit weights counted with their quantisation state). `adapted-layer base KiB`: "
        "the adapted layers' base weights as stored, and in fp32. `step CPU ms`: median main-thread CPU time "
        "(`time.thread_time`) per training step - **the machine was heavily loaded (2 cores shared by 8 people): "
        "read step times as rough ratios only**; accuracy, parameter and byte numbers are unaffected. `test acc`: "
        "task-2 test accuracy, mean [min-max] over seeds.",
    ]
    for story in args.stories:
        rows, missing, failed, notes = run_story(story, args.seeds, args.pretrain_steps, args.steps)
        title = {"digits": "Digits 0-4 -> 5-9, `DeepMLP(depth=3, width=128)`, fresh 5-class head",
                 "sequences": "Any of tokens 7/11/13 -> token 11 alone, `TinyBert` (2 layers, hidden 32) from a config"}[story]
        body.append(f"### {title}\n\n{markdown_table(rows)}")
        if missing:
            notes.append("Not measured (class not in `lightning_techniques.finetune` when this ran): "
                         + ", ".join(missing) + ".")
        for method, reason in failed.items():
            notes.append(f"{method} refused on this model: `{reason}`.")
        if notes:
            body.append("\n".join(f"- {n}" for n in notes))
    text = "\n\n".join(body)
    if args.no_record:
        print(text)
    else:
        record("finetune", "Fine-tuning: LoRA & co. vs. full fine-tuning (two-stage tasks)", text)


if __name__ == "__main__":
    main()
