"""The benchmarks' pairing helpers (timings themselves never enter a test): the paired design of
``benchmarks/overhead.py`` runs every variant in lockstep with a baseline run, alternating which starts."""

from __future__ import annotations

import pytest

from benchmarks.runner import Lockstep, paired_in_lockstep


def _stepper(log: list[tuple[str, int]], name: str, steps: int, fail_at: int | None = None):  # type: ignore[no-untyped-def]
    """A stand-in fit: ``steps`` training steps, handing over after each (as ``CPUStepTimer`` does)."""

    def fit(lockstep: Lockstep, me: int) -> str:
        for step in range(steps):
            if step == fail_at:
                raise RuntimeError(f"{name} failed")
            log.append((name, step))
            lockstep.hand_over(me)
        return name

    return fit


def test_lockstep_interleaves_two_fits_step_by_step_and_lets_the_longer_one_finish_alone() -> None:
    log: list[tuple[str, int]] = []
    assert Lockstep().run(_stepper(log, "a", 3), _stepper(log, "b", 5)) == ("a", "b")
    assert log == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2), ("b", 3), ("b", 4)]


def test_lockstep_raises_a_fits_error_after_both_ended() -> None:
    log: list[tuple[str, int]] = []
    with pytest.raises(RuntimeError, match="b failed"):
        Lockstep().run(_stepper(log, "a", 3), _stepper(log, "b", 3, fail_at=1))
    assert log == [("a", 0), ("b", 0), ("a", 1), ("a", 2)]  # the other fit was not left waiting


def test_every_variant_runs_in_lockstep_with_a_baseline_run_alternating_which_starts() -> None:
    log: list[tuple[str, int]] = []
    calls = {name: _stepper(log, name, 2) for name in ("base", "a", "b")}
    results = paired_in_lockstep(calls, "base", repeats=3)
    assert set(results) == {"base", "a", "b"}
    for name in ("a", "b"):
        assert results[name] == [(name, "base")] * 3
    assert len(results["base"]) == 6 and all(v == b == "base" for v, b in results["base"])
    pairs = [log[i:i + 4] for i in range(0, len(log), 4)]  # one pair of 2-step fits each
    assert len(pairs) == 6
    for index, pair in enumerate(pairs):
        round_index = index // 2
        first, second = pair[0][0], pair[1][0]
        assert (first == "base") == (round_index % 2 == 0)  # the baseline starts in even rounds
        assert [n for n, _ in pair] == [first, second, first, second]
    assert [p[0][0] if p[0][0] != "base" else p[1][0] for p in pairs] == ["a", "b", "b", "a", "a", "b"]  # rotated


def test_two_lightning_fits_run_in_lockstep_threads() -> None:
    """The overhead benchmark's fits (``run_once`` with a ``CPUStepTimer`` that hands over after every batch) run
    side by side in two threads: both complete with every step interval timed."""
    from benchmarks.overhead import run_once
    from lightning_techniques.demo import DeepMLP

    def fit(lockstep: Lockstep, me: int):  # type: ignore[no-untyped-def]
        return run_once(lambda: DeepMLP(depth=2, width=32), [], 1, (lockstep, me))

    first, second = Lockstep().run(fit, fit)
    assert first["steps"] == second["steps"] > 10
    assert all(t > 0 for t in first["cpu_steps"] + second["cpu_steps"])


def test_instrumented_hooks_are_dispatched_as_the_techniques_own() -> None:
    """``benchmarks.overhead.wrap_step_hooks`` wraps the implemented hooks on a per-instance subclass: the state key
    is unchanged, an unimplemented hook stays skipped and a ``needed_while`` hook stays conditional for Lightning."""
    from lightning.pytorch.trainer import call as lightning_call

    import lightning_techniques as lt
    from benchmarks.overhead import wrap_step_hooks
    from lightning_techniques._internal.lean_hooks import skipped_hooks

    calls: list[str] = []

    def wrap(fn):  # type: ignore[no-untyped-def]
        def wrapped(*args, **kwargs):  # type: ignore[no-untyped-def]
            calls.append(fn.__name__)
            return fn(*args, **kwargs)

        return wrapped

    lsuv = lt.LSUVInit()
    key, skipped = lsuv.state_key, skipped_hooks(lsuv)
    wrap_step_hooks(lsuv, wrap)
    assert isinstance(lsuv, lt.LSUVInit) and lsuv.state_key == key and skipped_hooks(lsuv) == skipped
    lsuv.done = True
    assert "on_train_batch_start" in skipped_hooks(lsuv)  # still conditional

    class Stub:  # what Lightning's dispatcher needs of a Trainer
        callbacks = [lsuv]
        lightning_module = None

    lightning_call._call_callback_hooks(Stub(), "on_train_batch_start", None, 0)
    assert calls == []  # skipped: LSUV is done
    lsuv.on_train_batch_start(None, None, None, 0)  # a direct call runs the wrapped hook
    assert calls == ["on_train_batch_start"]
