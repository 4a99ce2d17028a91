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
