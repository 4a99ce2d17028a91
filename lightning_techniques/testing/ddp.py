"""Running a DDP script (``strategy="ddp"``, ``accelerator="cpu"``, ``devices=2``, gloo) as users launch it.

A DDP test is a standalone script that Lightning re-launches once per rank. The script takes ``--out DIR`` (see
:func:`script_out_dir`), runs any number of ``Trainer.fit`` calls (one script can cover many techniques; Lightning
reuses the process group for later Trainers), and each rank saves what it observed with :func:`save_rank_result`.
The test calls :func:`run_ddp_script` and compares the ranks' results with :func:`assert_ranks_agree`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from lightning_techniques.testing.resume import assert_same


def script_out_dir(argv: list[str] | None = None) -> Path:
    """The ``--out DIR`` argument of a DDP script (created if missing)."""
    argv = sys.argv[1:] if argv is None else argv
    if "--out" not in argv:
        raise SystemExit("usage: script.py --out DIR")
    out = Path(argv[argv.index("--out") + 1])
    out.mkdir(parents=True, exist_ok=True)
    return out


def save_rank_result(out_dir: str | Path, rank: int, result: dict[str, Any]) -> Path:
    """Save one rank's observations (tensors, numbers, strings, lists, dicts) as ``rank{rank}.pt``."""
    path = Path(out_dir) / f"rank{rank}.pt"
    tmp = path.with_suffix(".tmp")
    torch.save(result, tmp)
    os.replace(tmp, path)
    return path


def run_ddp_script(script: str | Path, out_dir: str | Path, world_size: int = 2, timeout: float = 600,
                   extra_args: list[str] | None = None) -> list[dict[str, Any]]:
    """Run ``python script --out out_dir`` and return every rank's saved result (rank order).

    Raises AssertionError with the script's output when it fails or a rank saved nothing.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "PL_GLOBAL_SEED"):
        env.pop(key, None)
    cmd = [sys.executable, str(script), "--out", str(out_dir), *(extra_args or [])]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    log = f"$ {' '.join(cmd)}\n--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, f"DDP script failed with exit code {proc.returncode}\n{log}"
    results = []
    for rank in range(world_size):
        path = out_dir / f"rank{rank}.pt"
        assert path.exists(), f"rank {rank} saved no result at {path}\n{log}"
        results.append(torch.load(path, weights_only=True))
    return results


def assert_ranks_agree(results: list[dict[str, Any]], keys: list[str] | None = None, atol: float = 0.0) -> None:
    """Assert every rank's result equals rank 0's (for ``keys``, default all)."""
    reference = results[0]
    for rank, result in enumerate(results[1:], start=1):
        for key in keys or list(reference):
            assert key in result, f"rank {rank} has no result {key!r}"
            assert_same(reference[key], result[key], f"rank0 vs rank{rank}: {key}", atol)
