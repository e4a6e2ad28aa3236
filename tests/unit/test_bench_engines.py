"""`kvbm bench engines`' figures of one phase, from each engine's latencies:
a phase in which no call was made reports no latency and 0 calls/s, never
an error (a run once ended in an IndexError there)."""

from __future__ import annotations

from kvbm.bench.engines import EngineResult, phase_figures


def test_a_phase_without_engines_reports_zeros_and_none():
    # every engine left the crew before the phase: nothing was measured
    figures = phase_figures("load", [], seconds=5.0, node_cpu=0.3)
    assert figures == {
        "load_p50_us": None,
        "load_p99_us": None,
        "load_release_per_s": 0,
        "node_cpu_us_per_load": None,
        "engine_cpu_us_per_load": None,
        "load_engines": 0,
    }


def test_engines_that_made_no_call_took_part_and_measured_nothing():
    # two engines answered a phase of 0 s: they took part, made no call
    figures = phase_figures("lookup", [EngineResult([]), EngineResult([])], 0.0, node_cpu=0.0)
    assert figures["lookup_engines"] == 2
    assert figures["lookups_per_s"] == 0
    assert figures["lookup_p50_us"] is None


def test_calls_of_every_engine_count_together():
    # engine 0: 3 calls of 10 us; engine 1: one of 40 us; 2 s; 80 us of node CPU,
    # 100 us of the engines'
    results = [EngineResult([1e-5] * 3, cpu_s=6e-5), EngineResult([4e-5], cpu_s=4e-5)]
    figures = phase_figures("node_lookup", results, seconds=2.0, node_cpu=8e-5)
    assert figures == {
        "node_lookup_p50_us": 10.0,
        "node_lookup_p99_us": 40.0,
        "node_lookups_per_s": 2,
        "node_cpu_us_per_node_lookup": 20.0,
        "engine_cpu_us_per_node_lookup": 25.0,
        "node_lookup_engines": 2,
    }
