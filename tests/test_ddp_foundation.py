"""Foundation techniques and shared mechanisms under strategy="ddp" (2 CPU processes, gloo), ranks compared."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_techniques.testing import assert_ranks_agree, run_ddp_script

SCRIPT = Path(__file__).parent / "ddp" / "ddp_foundation.py"


@pytest.mark.ddp
@pytest.mark.slow
def test_foundation_under_ddp(tmp_path: Path) -> None:
    r0, r1 = run_ddp_script(SCRIPT, tmp_path)
    # LSUV: different first batches per rank, identical initial weights (rank 0's init was broadcast)
    assert r0["lsuv_first_inputs_differ"] != r1["lsuv_first_inputs_differ"]
    assert_ranks_agree([r0, r1], ["lsuv_weights", "lsuv_report"])
    assert all(abs(v - 1.0) < 0.1 for v in r0["lsuv_report"])
    # EarlyStopping: rank 1 logged another curve, yet every decision follows rank 0 and weights agree
    assert_ranks_agree([r0, r1], ["es_stopped_epoch", "es_best_epoch", "es_best_score", "es_final_weights"])
    assert r0["es_best_epoch"] == 2 and r0["es_stopped_epoch"] == 4
    # sampler steering: each rank takes every other position of the plan's global order (not re-permuted)
    n = r0["dataset_len"]
    order = list(range(n))[::-1]
    for step in range(3):
        window = order[step * 32 : (step + 1) * 32]
        assert r0["indices"][step] == window[0::2] and r1["indices"][step] == window[1::2]
        assert not set(r0["indices"][step]) & set(r1["indices"][step])
    # batch transform applied on both ranks; helpers reduce/agree
    assert r0["inputs_mean"] == r1["inputs_mean"] == 1.0
    # demo loader: a DistributedSampler Lightning leaves alone; mid-epoch resume was exact on each rank (asserted
    # in the script) and the ranks agree
    assert r0["sampler_type"] == "SteeredSampler"
    assert_ranks_agree([r0, r1], ["resume_weights"])
    assert torch.equal(r0["sum"], torch.tensor([3.0], dtype=torch.float64)) and r0["any"] and r1["any"]
