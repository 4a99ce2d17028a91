"""Test harness for techniques (ARCHITECTURE.md section 5): exact resume, DDP scripts, YAML builds.

Public so that users writing their own callbacks can hold them to the same contract.
"""

from lightning_techniques.testing.cli import build_from_yaml
from lightning_techniques.testing.contract import (
    SimulatedKill,
    assert_exact_resume_epochs,
    assert_fingerprints_equal,
    assert_picklable,
    kill_at_step,
    module_fingerprint,
)
from lightning_techniques.testing.ddp import (
    assert_ranks_agree,
    run_ddp_script,
    save_rank_result,
    script_out_dir,
)
from lightning_techniques.testing.resume import assert_exact_resume, assert_same

__all__ = [
    "SimulatedKill",
    "assert_exact_resume",
    "assert_exact_resume_epochs",
    "assert_fingerprints_equal",
    "assert_picklable",
    "kill_at_step",
    "module_fingerprint",
    "assert_ranks_agree",
    "assert_same",
    "build_from_yaml",
    "run_ddp_script",
    "save_rank_result",
    "script_out_dir",
]
