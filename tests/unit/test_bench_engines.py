"""`kvbm bench engines`' figures of one phase, from each engine's latencies:
a phase in which no call was made reports no latency and 0 calls/s, never
an error (a run once ended in an IndexError there)."""

from __future__ import annotations

from kvbm.bench.engines import EngineResult, PhaseCpu, phase_figures


def test_a_phase_without_engines_reports_zeros_and_none():
    # every engine left the crew before the phase: nothing was measured
    figures = phase_figures("load", [], 5.0, PhaseCpu(node_s=0.3, machine_s=0.5, cores=2))
    assert figures == {
        "load_p50_us": None,
        "load_p99_us": None,
        "load_release_per_s": 0,
        "node_cpu_us_per_load": None,
        "engine_cpu_us_per_load": None,
        "others_cpu_share_load": 0.02,  # 0.2 s of 2 cores' 10 s went elsewhere
        "load_engines": 0,
    }


def test_engines_that_made_no_call_took_part_and_measured_nothing():
    # two engines answered a phase of 0 s: they took part, made no call
    took_part = [EngineResult([]), EngineResult([])]
    figures = phase_figures("lookup", took_part, 0.0, PhaseCpu(0.0, 0.0, cores=2))
    assert figures["lookup_engines"] == 2
    assert figures["lookups_per_s"] == 0
    assert figures["lookup_p50_us"] is None
    assert figures["others_cpu_share_lookup"] is None  # no time to share


def test_calls_of_every_engine_count_together():
    # engine 0: 3 calls of 10 us; engine 1: one of 40 us; 2 s; 80 us of node CPU,
    # 100 us of the engines', 1 s of 2 cores' 4 s on something else
    results = [EngineResult([1e-5] * 3, cpu_s=6e-5), EngineResult([4e-5], cpu_s=4e-5)]
    cpu = PhaseCpu(node_s=8e-5, machine_s=1.0 + 8e-5 + 1e-4, cores=2)
    figures = phase_figures("node_lookup", results, 2.0, cpu)
    assert figures == {
        "node_lookup_p50_us": 10.0,
        "node_lookup_p99_us": 40.0,
        "node_lookups_per_s": 2,
        "node_cpu_us_per_node_lookup": 20.0,
        "engine_cpu_us_per_node_lookup": 25.0,
        "others_cpu_share_node_lookup": 0.25,
        "node_lookup_engines": 2,
    }
