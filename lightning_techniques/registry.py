"""The technique registry: one plain-data entry per public technique.

Every public technique of the package is an entry here: its class, area, extra, paper, a one-line summary (the
README's technique table is generated from these entries), a **tiny-run recipe** (demo module, demo data, the
technique's arguments, Trainer settings) and the contract points it claims. The generic contract tests
(``tests/test_contract*.py``) are parametrized over this registry, so a new technique is held to the whole contract -
YAML build, exact resume in ``max_steps``- and ``max_epochs``-bounded runs split mid-epoch, the user's module
untouched after ``fit`` and after an exception, combinations with every technique that takes over the same
mechanism (both callback orders), 2-process DDP agreement - the moment its entry exists. The model is MosaicML
Composer's ``tests/algorithms/algorithm_settings.py``.

What a technique *takes over* (``takes_over``) and which techniques it refuses to run with (``conflicts_with``) are
class attributes of the technique itself (the setup-time conflict check reads them there); the registry reads them
from the class, so there is one source of truth.

An entry that cannot meet a contract point lists it in ``exceptions`` with the reason - never a silent skip.
See ``ARCHITECTURE.md`` ("Adding a technique") for the step-by-step recipe.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

# The contract points an entry may list as an exception (with the reason).
CONTRACT_POINTS = ("yaml", "resume_steps", "resume_epochs", "module_untouched", "ddp", "combinations")

# Mechanisms / hooks whose owners are run together in pairs (both callback orders) by the combination tests.
SHARED_MECHANISMS = ("configure_optimizers", "train_sampler", "batch_transform", "criterion", "loss_term", "precision")


@dataclass(frozen=True)
class Recipe:
    """A tiny run that exercises the technique on the bundled demo data (seconds on one CPU core).

    ``module`` / ``data`` name classes of :mod:`lightning_techniques.demo`; ``kwargs`` are the technique's init
    arguments (plain data, as in a YAML file); ``trainer`` are extra ``Trainer`` arguments for every run of the entry.
    ``steps`` / ``split``: the ``max_steps``-bounded resume check (train ``steps``; checkpoint after ``split``).
    ``epochs`` / ``epoch_batches`` / ``epoch_split``: the ``max_epochs``-bounded check (``epochs`` epochs of
    ``epoch_batches`` batches; checkpoint after optimizer step ``epoch_split``, which must fall mid-epoch, then the
    run is killed by an exception and resumed).
    ``with_``: registry names of techniques the run needs beside this one (built from their own recipes' arguments),
    e.g. ``RNGStateCheckpoint`` for a technique on a dropout model, whose masks come from the global random state.
    """

    module: str = "DigitsCNN"
    module_kwargs: Mapping[str, Any] = field(default_factory=lambda: {"channels": 4})
    data: str = "DigitsDataModule"
    data_kwargs: Mapping[str, Any] = field(default_factory=lambda: {"batch_size": 32})
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    trainer: Mapping[str, Any] = field(default_factory=lambda: {"limit_val_batches": 0})
    steps: int = 6
    split: int = 3
    epochs: int = 2
    epoch_batches: int = 4
    epoch_split: int = 5
    with_: tuple[str, ...] = ()

    def build_module(self) -> Any:
        demo = importlib.import_module("lightning_techniques.demo")
        return getattr(demo, self.module)(**dict(self.module_kwargs))

    def build_data(self) -> Any:
        demo = importlib.import_module("lightning_techniques.demo")
        return getattr(demo, self.data)(**dict(self.data_kwargs))


EVAL_TRAINER = {"val_check_interval": 2, "limit_val_batches": 1}


@dataclass(frozen=True)
class Technique:
    """One registry entry (plain data)."""

    name: str
    area: str
    summary: str
    paper: str
    notebook: str
    recipe: Recipe | None
    kind: Literal["callback", "plugin", "loss"] = "callback"
    module_path: str = "lightning_techniques"
    extra: str | None = None
    gpu_only: str = "no"
    exceptions: Mapping[str, str] = field(default_factory=dict)

    @property
    def cls(self) -> type:
        return getattr(importlib.import_module(self.module_path), self.name)

    @property
    def takes_over(self) -> frozenset[str]:
        return frozenset(getattr(self.cls, "takes_over", frozenset()))

    @property
    def conflicts_with(self) -> tuple[str, ...]:
        return tuple(getattr(self.cls, "conflicts_with", ()))

    @property
    def changes_module(self) -> bool:
        """Whether the technique changes the module on purpose (fine-tuning adapters, layer swaps): its objects then
        report the paths they changed in ``changed_paths``, and "module untouched" means "nothing but those"."""
        return bool(getattr(self.cls, "changes_module", False))

    def claims(self, point: str) -> bool:
        """Whether the entry claims contract point ``point`` (it does unless listed as an exception)."""
        if point not in CONTRACT_POINTS:
            raise ValueError(f"point={point!r} is not a contract point; allowed: {', '.join(CONTRACT_POINTS)}.")
        return point not in self.exceptions and self.recipe is not None

    def companions(self) -> list[Any]:
        """Fresh objects of the techniques the recipe runs beside this one (``Recipe.with_``)."""
        return [] if self.recipe is None else [BY_NAME[name].build() for name in self.recipe.with_]

    def build(self, **overrides: Any) -> Any:
        """A fresh technique object from the recipe's arguments (``overrides`` replace some)."""
        if self.recipe is None:
            raise ValueError(f"{self.name} has no tiny-run recipe ({self.exceptions.get('resume_steps', '')}).")
        return self.cls(**{**dict(self.recipe.kwargs), **overrides})


def _t(name: str, area: str, summary: str, paper: str, notebook: str, recipe: Recipe | None = None, **kw: Any) -> Technique:
    return Technique(name, area, summary, paper, notebook, Recipe() if recipe is None else recipe, **kw)


_NB_QUICK = "00_quickstart"
_NB_DATA = "01_data_techniques"
_NB_OPTIM = "02_optimization"
_NB_EVAL = "03_evaluation_and_interpretation"
_NB_FINETUNE = "04_finetuning"
_NB_REG = "05_regularization_and_init"
_NB_SEARCH = "06_hyperparameter_search"
_IMBALANCED = {"batch_size": 32, "keep_fraction": {0: 0.1, 1: 0.1}}

REGISTRY: tuple[Technique, ...] = (
    # ------------------------------------------------------------------------------------------------ regularization
    _t("EarlyStopping", "regularization",
       "Lightning's early stopping (same arguments) that also restores the best weights, kept in memory or on disk",
       "Prechelt 1998; Keras `restore_best_weights`", _NB_QUICK,
       Recipe(kwargs={"monitor": "val_loss", "patience": 1}, trainer=EVAL_TRAINER)),
    # issue #13 (regularisation and initialisation) - one block
    _t("WeightInit", "init",
       "Xavier/Glorot, He/Kaiming (fan-in/out, nonlinearity-aware), orthogonal, uniform, normal or zero init per "
       "layer type / name pattern, biases constant; once at fit start (never on resume), rank 0 + broadcast; "
       "refuses symmetric zero stacks",
       "Glorot & Bengio 2010; He, Zhang, Ren & Sun 2015; Saxe, McClelland & Ganguli 2014", _NB_REG,
       Recipe(kwargs={"scheme": "kaiming_normal", "by_name": {"head": "zeros"}, "seed": 3})),
    _t("L1Penalty", "regularization",
       "`lambda * sum |w|` over the weights (not biases / norm parameters; regex / layer-type selection) added to the "
       "training loss through the loss-term mechanism, linear warm-up, logged; drives weights to zero",
       "Tibshirani 1996", _NB_REG, Recipe(kwargs={"coefficient": 1e-4, "warmup_steps": 2})),
    _t("L2Penalty", "regularization",
       "`lambda * sum w^2` over the weights added to the training loss (same selection, warm-up, logging); "
       "decoupled weight decay is `OptimizerCallback(\"adamw\", weight_decay=...)`",
       "Hoerl & Kennard 1970; Krogh & Hertz 1992", _NB_REG, Recipe(kwargs={"coefficient": 1e-3})),
    _t("LabelSmoothing", "regularization",
       "Smoothed targets `(1 - eps) y + eps / K` for the training batches through the criterion mechanism: "
       "`label_smoothing` of `nn.CrossEntropyLoss` (class weights included), smoothed targets for `FocalLoss`; "
       "validation loss left plain",
       "Szegedy, Vanhoucke, Ioffe, Shlens & Wojna 2016", _NB_REG, Recipe(kwargs={"epsilon": 0.1})),
    _t("DropoutSchedule", "regularization",
       "Schedules the rate of the model's dropout layers over training (linear warm-up or curriculum dropout's "
       "exponential approach to each layer's own or a common target), by optimizer step; rates restored at teardown",
       "Morerio, Cavazza, Volpi, Vidal & Murino 2017", _NB_REG,
       # dropout masks come from the global random state, which Lightning's checkpoints lack: with RNGStateCheckpoint
       Recipe(module_kwargs={"channels": 4, "dropout": 0.3}, kwargs={"steps": 6, "schedule": "curriculum"},
              with_=("RNGStateCheckpoint",))),
    _t("MCDropout", "regularization",
       "Monte-Carlo dropout at test / validation / predict: K stochastic passes with only the dropout layers "
       "active; accuracy and NLL of the mean prediction, predictive entropy and mutual information logged "
       "(DDP-summed), predict results kept",
       "Gal & Ghahramani 2016", _NB_REG,
       Recipe(module_kwargs={"channels": 4, "dropout": 0.3}, kwargs={"num_samples": 3, "stages": ["validate", "test"]},
              trainer=EVAL_TRAINER, with_=("RNGStateCheckpoint",))),  # (training a dropout model: see above)
    _t("WeightNoise", "regularization",
       "Gaussian (additive or multiplicative) noise on the weights for each training forward/backward; the clean "
       "weights are put back before the optimizer step, so checkpoints and validation never hold noise; seeded by "
       "step, batch and rank",
       "Graves 2011; Murray & Edwards 1994", _NB_REG, Recipe(kwargs={"std": 0.01, "seed": 1})),
    # end of issue #13 block
    # ------------------------------------------------------------------------------------------------ reproducibility
    _t("RNGStateCheckpoint", "reproducibility",
       "Every rank's torch / CUDA / numpy / Python random-generator states in the checkpoint (gathered under DDP, "
       "`weights_only`-safe), restored before the first resumed batch: dropout and random augmentation resume exactly",
       "PyTorch reproducibility notes; Hugging Face `Trainer` per-rank RNG checkpoints (Wolf et al. 2020)", _NB_QUICK,
       Recipe(module_kwargs={"channels": 4, "dropout": 0.3})),
    # ------------------------------------------------------------------------------------------------ init
    _t("LSUVInit", "init",
       "Orthonormal pre-init, then layer-by-layer scaling to unit output variance on the first batch; rank 0 "
       "computes and broadcasts; never re-runs on resume",
       "Mishkin & Matas 2016", _NB_QUICK),
    # ------------------------------------------------------------------------------------------------ data
    _t("CurriculumLearning", "data",
       "Easy-first train sampler whose pool grows by a pacing function (linear / root / geometric / step / callable, "
       "by step or epoch); difficulty from an array, a callable, self-paced or teacher loss; anti-curriculum; "
       "class-balanced ranking (plain-PyTorch `CurriculumSampler` too)",
       "Bengio et al. 2009; Hacohen & Weinshall 2019; Platanios et al. 2019", _NB_DATA,
       Recipe(kwargs={"difficulty": "self_paced", "start_fraction": 0.3, "full_at": 8, "pacing": "linear"})),
    _t("ClassWeightedLoss", "data",
       "Class weights (inverse, inverse-sqrt, effective number) from the training labels, applied to the module's "
       "criterion or exposed as `module.class_weights`; optional focal loss",
       "Cui et al. 2019; Lin et al. 2017", _NB_DATA,
       Recipe(data_kwargs=_IMBALANCED, kwargs={"mode": "effective", "beta": 0.999, "focal_gamma": 1.0})),
    _t("FocalLoss", "data",
       "Multi-class focal loss, a drop-in `nn.CrossEntropyLoss` (gamma=0 equals weighted CE)",
       "Lin et al. 2017", _NB_DATA, None, kind="loss",
       exceptions={point: "a loss module, not a callback: run through `ClassWeightedLoss(focal_gamma=...)`, whose "
                          "entry holds the contract" for point in CONTRACT_POINTS}),
    _t("Oversampling", "data",
       "Class-rebalancing (or user-weighted) draw of the training set, with/without replacement, seeded; one global "
       "draw split across DDP ranks",
       "Buda et al. 2018", _NB_DATA,
       Recipe(data_kwargs=_IMBALANCED, kwargs={"mode": "inverse", "seed": 3})),
    # ------------------------------------------------------------------------------------------------ normalization
    _t("ZScoreNormalization", "normalization",
       "Standardise inputs with train-split mean/std (streaming float64, DDP all-reduced), identical at "
       "train/val/test/predict, checkpointed (no refit on resume), exportable as a module",
       "LeCun, Bottou, Orr & Müller 1998", _NB_DATA),
    _t("MinMaxNormalization", "normalization",
       "Scale inputs to a feature range with train-split min/max, same fitting, checkpointing and export",
       "Han, Kamber & Pei 2011", _NB_DATA),
    # ------------------------------------------------------------------------------------------------ augment
    _t("InputNoise", "augment",
       "Gaussian / uniform / salt-and-pepper input noise in training only, with a scheduled scale",
       "Sietsma & Dow 1991; Bishop 1995", _NB_DATA,
       Recipe(kwargs={"scale": 0.2, "final_scale": 0.0, "schedule": "linear", "schedule_steps": 8, "seed": 1})),
    _t("ImageAugmentation", "augment",
       "On-device kornia flips / rotation / colour jitter with per-technique probability, training only",
       "Krizhevsky, Sutskever & Hinton 2012; kornia (Riba et al. 2020)", _NB_DATA,
       Recipe(kwargs={"hflip_p": 0.5, "rotation_degrees": 10.0, "seed": 2}), extra="augment"),
    _t("MixUp", "augment",
       "Convex mixes of sample pairs and one-hot targets; soft-target loss through the criterion mechanism",
       "Zhang, Cisse, Dauphin & Lopez-Paz 2018", _NB_DATA, Recipe(kwargs={"alpha": 0.4, "seed": 4})),
    _t("CutMix", "augment",
       "Paste a random box from another image, targets mixed by pasted area",
       "Yun et al. 2019", _NB_DATA, Recipe(kwargs={"alpha": 1.0, "seed": 5})),
    # ------------------------------------------------------------------------------------------------ optim
    _t("OptimizerCallback", "optim",
       "Any of 14 optimizers by name (Adam, AdamW, AMSGrad, SGD, Nesterov, RMSprop, Adagrad, Adadelta, NAdam, "
       "RAdam, L-BFGS, Rprop, SparseAdam, ASGD) without editing `configure_optimizers`; no weight decay on biases / "
       "norm weights; L-BFGS on Lightning's closure, SparseAdam + dense split, ASGD evaluated and checkpointed with "
       "averaged weights",
       "Kingma & Ba 2015; Loshchilov & Hutter 2019; Reddi et al. 2018; Liu & Nocedal 1989; Polyak & Juditsky 1992",
       _NB_OPTIM, Recipe(kwargs={"name": "adamw", "lr": 0.003, "weight_decay": 0.01})),
    _t("LRSchedule", "optim",
       "Warm-up + cosine / linear / polynomial / step / exponential decay, one-cycle, cosine warm restarts, stepped "
       "per optimizer step with the true step count under scheduled accumulation; logs `lr-<group>`",
       "Goyal et al. 2017; Loshchilov & Hutter 2017; Smith & Topin 2019", _NB_OPTIM,
       Recipe(kwargs={"schedule": "cosine", "warmup_steps": 2, "total_steps": 8})),
    _t("ReduceLROnPlateau", "optim",
       "Reduce the LR on a plateau of a logged metric (patience, factor, cooldown, min LR), the same decision on "
       "every DDP rank",
       "Bengio 2012", _NB_OPTIM,
       Recipe(kwargs={"monitor": "val_loss", "patience": 0, "factor": 0.5, "interval": "step", "frequency": 2},
              trainer=EVAL_TRAINER)),
    _t("NonFiniteGuard", "optim",
       "Skips optimizer steps whose gradients or loss are NaN/Inf (agreed across ranks; weights and optimizer state "
       "untouched), stops after N in a row",
       "Micikevicius et al. 2018", _NB_OPTIM),
    _t("AdaptiveGradientClipping", "optim",
       "Unit-wise gradient clipping relative to the weight norm, on unscaled, synchronised gradients",
       "Brock, De, Smith & Simonyan 2021", _NB_OPTIM, Recipe(kwargs={"clipping": 0.02})),
    _t("AutoClip", "optim",
       "Clips the gradient norm at a percentile of a bounded window of its history (window checkpointed)",
       "Seetharaman, Wichern, Pardo & Le Roux 2020", _NB_OPTIM, Recipe(kwargs={"percentile": 20.0})),
    _t("AccumulationScheduler", "optim",
       "Gradient accumulation scheduled by step or epoch, batch-size warm-up, aligned boundaries, true "
       "optimizer-step count for LR schedules; refuses DeepSpeed",
       "Goyal et al. 2017; Smith, Kindermans, Ying & Le 2018", _NB_OPTIM,
       Recipe(kwargs={"scheduling": {0: 1, 2: 2}, "unit": "step"}, epoch_batches=6, epoch_split=5)),
    _t("SmartMixedPrecision", "optim (precision plugin)",
       "Best mixed precision for the device (bf16 / fp16 + scaler / fp32), chosen modules kept in fp32, loss-scale "
       "history and the steps the scaler skipped",
       "Micikevicius et al. 2018; Kalamkar et al. 2019", _NB_OPTIM,
       Recipe(kwargs={"precision": "bf16-mixed", "device": "cpu"}), kind="plugin", gpu_only="fp16 path needs CUDA"),
    # ------------------------------------------------------------------------------------------------ evaluation
    _t("EvaluationReport", "evaluation",
       "Val/test metrics (accuracy, balanced accuracy, P/R/F1 macro/micro/per class, AUROC, AP, confusion matrix, "
       "ECE + reliability diagram; MAE/RMSE/R²) with bootstrap CIs at test, as tables and figures",
       "Guo et al. 2017; Efron 1979", _NB_EVAL,
       Recipe(kwargs={"figures": False, "every_n_val_epochs": 1}, trainer=EVAL_TRAINER)),
    _t("PermutationImportance", "evaluation",
       "Score drop when each input feature is permuted or a named layer's output is ablated",
       "Breiman 2001; Fisher, Rudin & Dominici 2019", _NB_EVAL,
       Recipe(kwargs={"features": True, "layers": ["head"], "stages": ["validate"], "n_repeats": 2,
                      "max_samples": 32, "every_n_val_epochs": 1}, trainer=EVAL_TRAINER), extra="interpret"),
    # ------------------------------------------------------------------------------------------------ interpret
    _t("TSNELogger", "interpret",
       "t-SNE of penultimate-layer embeddings coloured by label, 5-NN separation score, TensorBoard projector",
       "van der Maaten & Hinton 2008", _NB_EVAL,
       Recipe(kwargs={"every_n_val_epochs": 2, "max_samples": 40, "max_iter": 250, "projector": False},
              trainer=EVAL_TRAINER), extra="interpret"),
    _t("AttentionMapLogger", "interpret",
       "Attention maps of chosen layers/heads (SDPA via q/k recomputation, `nn.MultiheadAttention`, "
       "`nn.TransformerEncoder`, Hugging Face `transformers` >= 5 models under any `attn_implementation`, "
       "padding/causal masks, rotary and grouped-query heads included), model outputs bit-identical",
       "Vaswani et al. 2017; Vig 2019", _NB_EVAL,
       Recipe(module="TinyTransformer", module_kwargs={"d_model": 16, "heads": 2},
              kwargs={"every_n_val_epochs": 1, "num_samples": 1}, trainer=EVAL_TRAINER)),
    _t("SaliencyLogger", "interpret",
       "Vanilla-gradient saliency maps of fixed samples, overlays + arrays, under `inference_mode`, rank 0 only",
       "Simonyan, Vedaldi & Zisserman 2014", _NB_EVAL,
       Recipe(kwargs={"every_n_val_epochs": 1, "max_samples": 4}, trainer=EVAL_TRAINER), extra="interpret"),
    _t("IntegratedGradientsLogger", "interpret",
       "Integrated Gradients with the completeness check reported",
       "Sundararajan, Taly & Yan 2017", _NB_EVAL,
       Recipe(kwargs={"every_n_val_epochs": 1, "max_samples": 3, "n_steps": 8}, trainer=EVAL_TRAINER),
       extra="interpret"),
    _t("DeepLiftLogger", "interpret",
       "DeepLIFT (Rescale) attributions with the summation-to-delta check",
       "Shrikumar, Greenside & Kundaje 2017", _NB_EVAL,
       Recipe(kwargs={"every_n_val_epochs": 1, "max_samples": 3}, trainer=EVAL_TRAINER), extra="interpret"),
    _t("GradCAMLogger", "interpret",
       "Grad-CAM heatmaps (layer by name or the last `Conv2d`), upsampled and overlaid",
       "Selvaraju et al. 2017", _NB_EVAL,
       Recipe(kwargs={"every_n_val_epochs": 1, "max_samples": 3}, trainer=EVAL_TRAINER), extra="interpret"),
    _t("SHAPLogger", "interpret",
       "SHAP values (GradientExplainer, DeepExplainer where the model allows, warned fallback) against a "
       "training-data background",
       "Lundberg & Lee 2017", _NB_EVAL,
       Recipe(kwargs={"every_n_val_epochs": 2, "max_samples": 2, "background_size": 8, "nsamples": 20},
              trainer=EVAL_TRAINER), extra="interpret"),
    _t("LIMELogger", "interpret",
       "LIME over grid superpixels through Captum",
       "Ribeiro, Singh & Guestrin 2016", _NB_EVAL,
       Recipe(kwargs={"every_n_val_epochs": 2, "max_samples": 2, "n_samples": 20, "superpixel_size": 4},
              trainer=EVAL_TRAINER), extra="interpret"),
    # ------------------------------------------------------------------ issue #13: batch norm (helper REG-A)
    _t("PreciseBN", "normalization",
       "BatchNorm running statistics recomputed before each validation / at fit end as the true average over N "
       "training batches (seeded choice, train-stage batch hooks, exact all-reduce under DDP), modes restored",
       "Wu & Johnson 2021", _NB_REG,
       Recipe(module_kwargs={"channels": 4, "batch_norm": True}, kwargs={"num_batches": 3, "seed": 1},
              trainer=EVAL_TRAINER)),
    _t("FreezeBatchNorm", "normalization",
       "Chosen BatchNorm layers frozen for fine-tuning: running statistics (eval mode in training) and/or affine "
       "weights (`requires_grad` off before the optimizer is built); restored at teardown and on an exception",
       "Wu & Johnson 2021; Ioffe & Szegedy 2015", _NB_QUICK,
       # every BN layer frozen: DDP broadcasts buffers at the start of each forward, so an unfrozen layer's running
       # statistics differ between ranks after the last step (plain DDP behaviour), which the DDP contract compares
       Recipe(module_kwargs={"channels": 4, "batch_norm": True})),
    _t("NormSwap", "normalization",
       "BatchNorm layers replaced by GroupNorm / LayerNorm / InstanceNorm for tiny batches, in `setup` before the "
       "optimizer is built; per-channel affine weights carried over, running statistics dropped (a declared change)",
       "Wu & He 2018; Ba, Kiros & Hinton 2016", _NB_REG,
       Recipe(module_kwargs={"channels": 4, "batch_norm": True}, data_kwargs={"batch_size": 4},
              kwargs={"to": "group", "num_groups": 2})),
    _t("SyncBatchNormConversion", "normalization",
       "Chosen BatchNorm layers converted to `nn.SyncBatchNorm` under DDP for one fit (statistics over the global "
       "batch) and the original layers put back with the trained weights; a logged no-op in one process",
       "Ioffe & Szegedy 2015; Peng et al. 2018 (MegDet)", _NB_QUICK,
       Recipe(module_kwargs={"channels": 4, "batch_norm": True}, kwargs={"targets": ["features\\.6\\.0"]}),
       exceptions={"ddp": "torch's nn.SyncBatchNorm synchronises CUDA / XPU tensors only: under the contract's CPU "
                          "(gloo) DDP launch it is refused at setup; the single-process run is a logged no-op",
                   "combinations": "a no-op in the single-process stack, refused (CPU) in the DDP stack that reuses "
                                   "it; its own runs cover fit, resume and module untouched"}),
    _t("ActivationNoise", "regularization",
       "Gaussian noise (additive or multiplicative, scheduled scale) on the outputs of chosen layers in training "
       "batches only, through forward hooks removed at teardown / on an exception; seeded by step, micro-batch, rank",
       "Poole, Sohl-Dickstein & Ganguli 2014; Srivastava et al. 2014 (Gaussian dropout)", _NB_REG,
       Recipe(kwargs={"targets": ["features.1"], "std": 0.2, "final_std": 0.0, "schedule": "linear",
                      "schedule_steps": 6, "seed": 1})),
    _t("ActivationDropout", "regularization",
       "Dropout inserted after chosen layers through forward hooks (no layers added, `state_dict` unchanged), in "
       "training batches only; masks seeded by step, micro-batch and rank, so resume is exact without RNG state",
       "Srivastava et al. 2014", _NB_REG,
       Recipe(kwargs={"targets": ["features.6"], "p": 0.2, "seed": 1})),
    # ------------------------------------------------------------------ issue #13: adversarial (helper REG-B)
    _t("AdversarialTraining", "regularization",
       "FGSM or PGD (L-inf / L2, seeded random start, input range) adversarial examples of each training batch, "
       "their loss added through the loss-term mechanism; input-only gradients (DDP reducer and parameter grads "
       "untouched), fp16 loss scale, BatchNorm statistics from the clean forward only",
       "Goodfellow, Shlens & Szegedy 2015; Madry, Makelov, Schmidt, Tsipras & Vladu 2018", _NB_REG,
       # no input_range: beside a normalisation technique (the stack) the inputs are z-scores, not pixels in [0, 1]
       Recipe(kwargs={"method": "pgd", "eps": 0.1, "steps": 2, "seed": 1})),
    _t("VirtualAdversarialTraining", "regularization",
       "Virtual adversarial training: the KL divergence between the predictions at x and at x + r_adv, r_adv from "
       "power iteration (fp32 outside autocast), no labels needed, added through the loss-term mechanism; seeded, "
       "BatchNorm statistics untouched",
       "Miyato, Maeda, Koyama & Ishii 2018", _NB_REG,
       Recipe(kwargs={"eps": 1.0, "power_iterations": 1, "seed": 1})),
    # ------------------------------------------------------------------ issue #11: LoRA, QLoRA (helper LORA)
    _t("LoRA", "finetune",
       "peft LoRA (or DoRA, IA3, LoHa, LoKr) on layers chosen by name, regex or type of a stock LightningModule; "
       "only the adapters train and reach the optimizer (module's own or `OptimizerCallback`); adapter-only "
       "checkpoints and files that load onto a fresh base model; optional merge into the base weights at the end",
       "Hu et al. 2021; Liu et al. 2024 (DoRA); Liu et al. 2022 (IA3); Hyeon-Woo et al. 2022 (LoHa)", _NB_FINETUNE,
       Recipe(kwargs={"targets": ["features.0", "head"], "rank": 2, "alpha": 4.0}), extra="finetune"),
    _t("QLoRA", "finetune",
       "The base `nn.Linear` layers quantised to 4-bit NF4 with bitsandbytes (double quantisation optional, compute "
       "dtype chosen) in `setup` - on the CPU too, where Lightning's `BitsandbytesPrecision` refuses - with peft "
       "LoRA on top; base weights at about 1/7 of their fp32 bytes",
       "Dettmers, Pagnoni, Holtzman & Zettlemoyer 2023", _NB_FINETUNE,
       Recipe(module="DeepMLP", module_kwargs={"depth": 3, "width": 64, "optimizer": "adam"},
              kwargs={"rank": 2, "alpha": 4.0}), extra="finetune"),
    # ------------------------------------------------------------------ issue #11: ReLoRA, AdaLoRA, prompts, adapters (helper FT2)
    _t("Adapters", "finetune",
       "Houlsby bottleneck adapters (`h + up(act(down(h)))`, up-projection near zero: the model starts unchanged) "
       "after chosen sublayers of any module (name / regex / type); only they (and `train_also`) train and reach the "
       "optimizer; base `state_dict` keys unchanged",
       "Houlsby et al. 2019", _NB_FINETUNE,
       Recipe(kwargs={"targets": ["features.0", "features.5"], "bottleneck": 2, "train_also": ["head"]}),
       extra="finetune"),
    _t("ReLoRA", "finetune",
       "LoRA (peft) merged into the frozen base weights and restarted every N steps, the factors' optimizer state "
       "pruned by magnitude, jagged cosine LR with re-warm-up; the sum of low-rank updates reaches a higher rank; "
       "exact resume across a restart",
       "Lialin, Shivagunde, Muckatira & Rumshisky 2023", _NB_FINETUNE,
       Recipe(kwargs={"targets": ["features.5", "head"], "r": 2, "restart_every": 3, "rewarm_steps": 1,
                      "total_steps": 6}), extra="finetune"),
    _t("AdaLoRA", "finetune",
       "peft's AdaLoRA: SVD-form adapters whose rank budget shrinks to `target_r` by importance; "
       "`update_and_allocate` once per optimizer step after the step, gradients present (accumulation too); "
       "orthogonality term through the loss-term mechanism; allocator state checkpointed",
       "Zhang et al. 2023", _NB_FINETUNE,
       Recipe(kwargs={"targets": ["head"], "init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 1, "total_steps": 6,
                      "orth_reg_weight": 0.1}), extra="finetune"),
    _t("PromptTuning", "finetune",
       "Learnable virtual tokens in front of the input, the model frozen: peft's prompt tuning on a `transformers` "
       "model inside the module, or a soft prompt at a named layer of a plain token-sequence module; refused at "
       "setup on modules without token sequences",
       "Lester, Al-Rfou & Constant 2021", _NB_FINETUNE,
       Recipe(module="TinyBert", module_kwargs={"max_length": 16, "hidden_size": 16, "heads": 2},
              data="TokenPresenceDataModule", data_kwargs={"n_samples": 128, "batch_size": 16},
              kwargs={"num_tokens": 4}), extra="finetune"),
    _t("PrefixTuning", "finetune",
       "Learnable prefix activations at every layer, the model frozen: peft's prefix tuning on `transformers` "
       "models that take `past_key_values` (causal LMs), or per-layer prefix tokens on a plain token-sequence module",
       "Li & Liang 2021", _NB_FINETUNE,
       Recipe(module="TinyTransformer", module_kwargs={"d_model": 16, "heads": 2},
              kwargs={"num_tokens": 2, "at": ["blocks.0", "blocks.1"], "train_also": ["head"]}), extra="finetune"),
    # ------------------------------------------------------------------ issue #12: search (helpers OPTUNA, RAY)
    _t("OptunaPruning", "search",
       "Reports a logged metric to an Optuna trial at every validation (by global step: several per epoch work) and "
       "stops unpromising runs on every rank at once (trial on rank 0 only, decision broadcast under DDP); never "
       "reports a step twice after a resume; a monitor the module never logs fails at the first validation",
       "Akiba, Sano, Yanase, Ohta & Koyama 2019 (Optuna); Jamieson & Talwalkar 2016; Li et al. 2018", _NB_SEARCH,
       # the recipe's callback has no trial of its own: it reports into a one-trial in-memory study (never prunes)
       Recipe(kwargs={"monitor": "val_loss"}, trainer=EVAL_TRAINER), extra="hpo"),
    _t("RayTuneReport", "search",
       "Reports the monitored metrics (with global step and epoch) to the Ray Tune trial at every validation end "
       "with a Lightning checkpoint, so ASHA can stop the trial and Ray resume it; a monitor never logged fails at "
       "the first validation; outside a Tune trial it only records (driver: ray_search, the same YAML space)",
       "Liaw et al. 2018 (Tune); Li et al. 2020 (ASHA)", _NB_SEARCH,
       # the recipe runs outside a Ray Tune trial (it records the reports); inside one: tests/test_search_ray.py
       Recipe(kwargs={"monitor": ["val_loss", "val_acc"]}, trainer=EVAL_TRAINER), extra="ray"),
)

BY_NAME: dict[str, Technique] = {entry.name: entry for entry in REGISTRY}


def entries(point: str | None = None) -> list[Technique]:
    """The registry's entries, or those that claim contract ``point``."""
    return [entry for entry in REGISTRY if point is None or entry.claims(point)]


def combination_pairs() -> list[tuple[Technique, Technique]]:
    """Every ordered pair of distinct entries that take over a shared mechanism in common (both orders)."""
    pairs = []
    runnable = [entry for entry in REGISTRY if entry.claims("combinations")]
    for first in runnable:
        for second in runnable:
            if first is not second and first.takes_over & second.takes_over & set(SHARED_MECHANISMS):
                pairs.append((first, second))
    return pairs


def readme_table() -> str:
    """The README's technique table, generated from the registry (``python -m lightning_techniques.registry``)."""

    def claim(entry: Technique, point: str) -> str:
        if entry.claims(point):
            return "yes"
        return "via `ClassWeightedLoss`" if entry.name == "FocalLoss" else "no"

    rows = ["| Class | Area | What it does | Paper | DDP | Resume | GPU-only | Notebook |",
            "|---|---|---|---|---|---|---|---|"]
    for entry in REGISTRY:
        resume = "yes" if entry.claims("resume_steps") and entry.claims("resume_epochs") else claim(entry, "resume_steps")
        rows.append(
            f"| `{entry.name}` | {entry.area} | {entry.summary} | {entry.paper} | {claim(entry, 'ddp')} | {resume} "
            f"| {entry.gpu_only} | `{entry.notebook}` |"
        )
    return "\n".join(rows)


def update_readme(path: str = "README.md") -> bool:
    """Write :func:`readme_table` between the ``<!-- techniques-table -->`` markers of ``path``; True if it changed."""
    from pathlib import Path

    readme = Path(path)
    text = readme.read_text()
    start, end = "<!-- techniques-table -->", "<!-- /techniques-table -->"
    if start not in text or end not in text:
        raise ValueError(f"{path} has no {start} ... {end} markers.")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    new = f"{head}{start}\n{readme_table()}\n{end}{tail}"
    readme.write_text(new)
    return new != text


if __name__ == "__main__":  # pragma: no cover - `python -m lightning_techniques.registry [--update-readme]`
    import sys

    if "--update-readme" in sys.argv[1:]:
        print("README.md updated" if update_readme() else "README.md already up to date")
    else:
        print(readme_table())
