"""The bundled demo: real data shipped with scikit-learn, small models, and the LightningCLI entry point."""

from lightning_techniques.demo.data import (
    BreastCancerDataModule,
    DigitsDataModule,
    EpochPermutation,
    LabeledTensorDataset,
    ResumableDataLoader,
    TokenPresenceDataModule,
    epoch_shuffle_sampler,
)
from lightning_techniques.demo.models import (
    ClassifierModule,
    DeepMLP,
    DigitsCNN,
    SelfAttention,
    TabularMLP,
    TinyBert,
    TinyTransformer,
)

__all__ = [
    "BreastCancerDataModule",
    "ClassifierModule",
    "DeepMLP",
    "DigitsCNN",
    "DigitsDataModule",
    "EpochPermutation",
    "LabeledTensorDataset",
    "ResumableDataLoader",
    "SelfAttention",
    "TabularMLP",
    "TinyBert",
    "TinyTransformer",
    "TokenPresenceDataModule",
    "epoch_shuffle_sampler",
]
