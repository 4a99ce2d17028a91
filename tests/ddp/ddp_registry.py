"""DDP run (2 CPU processes, gloo) over the technique registry: every entry that claims DDP runs its tiny recipe
under ``strategy="ddp"``; then the stack of every compatible technique trains straight and resumes exactly from a
mid-epoch checkpoint. Each rank saves its weights and technique states; tests/test_contract_ddp.py checks the ranks
agree (one process launch for all techniques keeps the suite fast).

Usage: ``python ddp_registry.py --out DIR`` (Lightning re-launches it for rank 1).
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ on the path for the stack helpers

from test_contract_combinations import STACK, split, stack_recipe  # noqa: E402

from lightning_techniques import registry  # noqa: E402
from lightning_techniques.testing import (  # noqa: E402
    assert_exact_resume,
    assert_fingerprints_equal,
    assert_picklable,
    module_fingerprint,
    save_rank_result,
    script_out_dir,
)
from lightning_techniques.testing.contract import declared_changes  # noqa: E402

warnings.filterwarnings("ignore")  # a standalone script: keep the subprocess output readable
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
torch.set_num_threads(1)

DDP = dict(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_checkpointing=False,
           enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, deterministic=True)


def main() -> None:
    out = script_out_dir()
    result: dict = {}
    rank = 0
    for entry in registry.entries("ddp"):
        recipe = entry.recipe
        assert recipe is not None
        make_callbacks, make_plugins = split([entry])
        L.seed_everything(0, verbose=False)
        module, callbacks = recipe.build_module(), make_callbacks()
        trainer = L.Trainer(max_steps=recipe.steps, callbacks=callbacks, plugins=make_plugins() or None,
                            default_root_dir=str(out / "runs" / entry.name), **DDP, **recipe.trainer)
        trainer.fit(module, datamodule=recipe.build_data())
        rank = trainer.global_rank
        result[entry.name] = {
            "steps": trainer.global_step,
            "weights": {k: v.detach().cpu() for k, v in module.state_dict().items()},
            # the entry's own state (companions such as RNGStateCheckpoint have their own entries)
            "state": {cb.state_key: cb.state_dict() for cb in callbacks if type(cb) is entry.cls},
        }
    recipe = stack_recipe(STACK)
    make_callbacks, make_plugins = split(STACK)
    ddp = {k: v for k, v in DDP.items() if k in ("devices", "strategy")}
    # callback states are compared on rank 0: Lightning saves them from rank 0 and loads that state on every rank, so
    # a rank-0-only logger's state on rank 1 is empty in a straight run and rank 0's after a resume
    straight = assert_exact_resume(recipe.build_module, recipe.build_data, make_callbacks, out / "stack",
                                   total_steps=recipe.steps, split_step=recipe.split,
                                   trainer_kwargs={**recipe.trainer, **ddp}, make_plugins=make_plugins,
                                   compare_state=rank == 0)
    # module untouched under DDP too: the stack's module against the same run with no technique
    L.seed_everything(0, verbose=False)
    clean = recipe.build_module()
    L.Trainer(max_steps=recipe.steps, default_root_dir=str(out / "clean"), **DDP, **recipe.trainer).fit(
        clean, datamodule=recipe.build_data())
    # nothing but the declared changes (fine-tuning adapters: ``changes_module``/``changed_paths``)
    assert_fingerprints_equal(module_fingerprint(clean), module_fingerprint(straight["module"]), "stack under DDP",
                              changed_paths=declared_changes(straight["callbacks"]))
    assert_picklable(straight["module"])
    result["<stack>"] = {
        "weights": {k: v.detach().cpu() for k, v in straight["module"].state_dict().items()},
        "names": [entry.name for entry in STACK],
        "untouched": True,
    }
    save_rank_result(out, rank, result)


if __name__ == "__main__":
    main()
