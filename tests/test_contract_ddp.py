"""2-process DDP over the technique registry: every entry that claims DDP, then the compatible stack resumed exactly,
all in one process launch (tests/ddp/ddp_registry.py); the ranks must agree on weights and technique state."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_techniques import registry
from lightning_techniques.testing import assert_ranks_agree, run_ddp_script

SCRIPT = Path(__file__).parent / "ddp" / "ddp_registry.py"
# techniques whose state is meant to differ between ranks (besides the rank-0 evaluation loggers)
RANK_LOCAL_STATE = {
    "RNGStateCheckpoint": "holds the generator states of its own rank (all ranks' in rank 0's save)",
    "MixUp": "each rank draws its own mixing coefficient (seeded by step and rank); last_lam is that rank's",
    "CutMix": "each rank draws its own box (seeded by step and rank); last_lam is that rank's",
}


@pytest.mark.ddp
@pytest.mark.slow
def test_every_entry_and_the_stack_agree_across_ranks(tmp_path: Path) -> None:
    r0, r1 = run_ddp_script(SCRIPT, tmp_path)
    expected = {entry.name for entry in registry.entries("ddp")} | {"<stack>"}
    assert set(r0) == set(r1) == expected
    for entry in registry.entries("ddp"):
        stops = "stopping" in entry.takes_over  # EarlyStopping may end its run sooner (on both ranks alike)
        assert r0[entry.name]["steps"] == entry.recipe.steps or stops, entry.name
    assert len(r0["<stack>"]["names"]) >= 20
    assert r0["<stack>"]["untouched"] and r1["<stack>"]["untouched"]  # module fingerprints checked in the script
    assert_ranks_agree([r0["<stack>"], r1["<stack>"]])
    failures: list[str] = []
    for entry in registry.entries("ddp"):
        # weights and step counts agree for every entry; technique state too, except for the evaluation loggers
        # whose state lives on rank 0, the rank that logs
        rank_local = "eval_hooks" in entry.takes_over or entry.name in RANK_LOCAL_STATE
        keys = ["steps", "weights"] if rank_local else ["steps", "weights", "state"]
        try:
            assert_ranks_agree([r0[entry.name], r1[entry.name]], keys=keys)
        except AssertionError as err:
            failures.append(f"{entry.name}: {err}")
    assert not failures, "\n".join(failures)
