"""DDP script of the `transforms` group (normalisation, input noise, augmentation, MixUp/CutMix): 2 CPU ranks, gloo.

Run by tests/test_normalization.py::test_ddp_transforms_group as ``python ddp_transforms.py --out DIR``.
"""

from __future__ import annotations

import lightning as L
import torch

from lightning_techniques import CutMix, ImageAugmentation, InputNoise, MinMaxNormalization, MixUp, ZScoreNormalization
from lightning_techniques.demo import BreastCancerDataModule, DigitsCNN, DigitsDataModule, TabularMLP
from lightning_techniques.testing import save_rank_result, script_out_dir


def trainer(root, **kwargs) -> L.Trainer:
    base = dict(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, max_steps=2,
                limit_val_batches=1, default_root_dir=str(root))
    base.update(kwargs)
    return L.Trainer(**base)


def flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def main() -> None:
    out = script_out_dir()
    result: dict = {}

    # 1) Z-score and Min-Max: each rank fits on its shard, the summaries are all-reduced exactly
    L.seed_everything(0)
    zscore, dm = ZScoreNormalization(), BreastCancerDataModule()
    t = trainer(out / "z", callbacks=[zscore])
    t.fit(TabularMLP(), datamodule=dm)
    t.save_checkpoint(out / "z.ckpt")
    raw = dm.train_dataset.inputs.double()
    result.update(
        zscore_mean=zscore.mean, zscore_std=zscore.std, zscore_count=int(zscore.stats["count"]),
        reference_mean=raw.mean(0), reference_std=raw.std(0, unbiased=False), n_train=len(raw),
        reference_min=raw.amin(0), reference_max=raw.amax(0),
    )
    L.seed_everything(0)
    minmax = MinMaxNormalization()
    trainer(out / "m", callbacks=[minmax]).fit(TabularMLP(), datamodule=BreastCancerDataModule())
    result.update(minmax_min=minmax.data_min, minmax_max=minmax.data_max)

    # resume under DDP: no refit on any rank
    L.seed_everything(0)
    resumed = ZScoreNormalization()
    trainer(out / "r", max_steps=4, callbacks=[resumed]).fit(TabularMLP(), datamodule=BreastCancerDataModule(), ckpt_path=str(out / "z.ckpt"))
    result.update(resumed_num_fits=resumed.num_fits, resumed_mean=resumed.mean)

    # 2) noise + kornia augmentation + MixUp on digits; then CutMix: weights agree on both ranks
    for name, callbacks in (
        ("augment", [InputNoise(scale=0.2, final_scale=0.0, schedule="linear"),
                     ImageAugmentation(rotation_degrees=10, brightness=0.2), MixUp(alpha=0.4)]),
        ("cutmix", [CutMix()]),
    ):
        L.seed_everything(0)
        module = DigitsCNN(channels=4)
        before = flat(module)
        trainer(out / name, max_steps=3, callbacks=callbacks).fit(module, datamodule=DigitsDataModule())
        result[f"{name}_weights"] = flat(module)
        result[f"{name}_weights_changed"] = bool((flat(module) - before).abs().max() > 0)

    save_rank_result(out, t.global_rank, result)


if __name__ == "__main__":
    main()
