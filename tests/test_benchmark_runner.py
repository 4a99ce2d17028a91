"""The benchmarks' round-robin helpers (timings themselves never enter a test): the paired design of
``benchmarks/overhead.py`` puts every variant call right beside a baseline call, alternating which goes first."""

from __future__ import annotations

from benchmarks.runner import paired_with_baseline


def test_every_variant_call_is_paired_with_an_adjacent_baseline_call_alternating_order() -> None:
    log: list[str] = []

    def call(name: str):  # type: ignore[no-untyped-def]
        def run() -> tuple[str, int]:
            log.append(name)
            return name, len(log) - 1  # the position of the call

        return run

    results = paired_with_baseline({"base": call("base"), "a": call("a"), "b": call("b")}, "base", repeats=3)
    assert set(results) == {"base", "a", "b"}
    for name in ("a", "b"):
        assert len(results[name]) == 3
        for round_index, ((variant, at), (base, base_at)) in enumerate(results[name]):
            assert (variant, base) == (name, "base")
            assert abs(at - base_at) == 1  # right beside each other
            assert (base_at < at) == (round_index % 2 == 0)  # baseline first in even rounds, second in odd ones
    assert len(results["base"]) == 6 and all(v == b for v, b in results["base"])
    assert log.count("base") == 6 and log.count("a") == log.count("b") == 3
    assert log[1] == "a" and log[4] == "b"  # the variants' order rotates each round (b, then a, in round 1)


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
