"""`kvbm bench engines`' crew of engine processes against a real node: an
engine that never becomes ready is named with the reason and no phase waits
for it; an engine that stops answering mid-phase (its node frozen) leaves
the crew, and a phase nobody is left for reports nothing, without an error."""

from __future__ import annotations

import signal

from kvbm.bench.engine_crew import EngineCrew
from kvbm.bench.engines import PhaseCpu, engine_process, phase_figures


def test_an_engine_that_cannot_attach_is_named_and_the_others_run(daemons, tmp_path):
    node = daemons("solo", "127.0.0.2", "--host-cache-mb", "64")
    nowhere = str(tmp_path / "no-node.sock")
    # engine 0 on the node, engine 1 on a socket where no node listens
    with EngineCrew(engine_process, [(node.socket, 0), (nowhere, 1)]) as crew:
        absent = crew.wait_ready(timeout=120)
        # engine 1 said why it failed: the crew did not wait out the timeout for it
        assert [a.engine for a in absent] == [1]
        assert absent[0].why.startswith("NodeError"), absent[0].why
        assert crew.members == [0]
        # the phase runs on the engine that is ready, and only on it
        crew.phase("miss", 0.2, grace=30)
        results = crew.results()
        assert list(results) == [0]
        assert results[0].times and results[0].wrong == 0
        figures = phase_figures("miss", list(results.values()), 0.2, PhaseCpu(0.0, 0.0, 2))
        assert figures["miss_engines"] == 1


def test_an_engine_frozen_in_a_phase_leaves_and_an_empty_phase_is_zeros(daemons):
    node = daemons("solo", "127.0.0.2", "--host-cache-mb", "64")
    with EngineCrew(engine_process, [(node.socket, 0)]) as crew:
        assert crew.wait_ready(timeout=120) == []
        # the node frozen: the engine's round trips wait, it misses its phase's end
        node.proc.send_signal(signal.SIGSTOP)
        try:
            crew.phase("node_lookup", 1.0, grace=0.5)
            assert crew.results() == {}
        finally:
            node.proc.send_signal(signal.SIGCONT)
        assert [(a.engine, a.why) for a in crew.absent] == [
            (0, "no result of phase node_lookup in time")
        ]
        # nobody is left: the next phase starts nothing and measures nothing
        crew.phase("lookup", 0.1, grace=0.5)
        assert crew.results() == {}
    figures = phase_figures("lookup", [], 0.1, PhaseCpu(0.0, 0.0, 2))
    assert figures["lookup_engines"] == 0
    assert figures["lookups_per_s"] == 0
    assert figures["lookup_p50_us"] is None
