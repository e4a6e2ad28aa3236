"""The serving peer SIGKILLed at random points of 20 pulls. Three nodes: A and
C each hold half of a prompt (A the first half, C the second), B pulls the
whole prompt from both; one of A and C dies at a random moment of each pull.
Every pull returns within its timeout, every block B hands its engine is
bit-exact, and every block B registered along the way is too (read back from
B alone afterwards)."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from kvbm.connector.attach import Available, NodeAttachment
from tests.harness.node_daemon import Daemon, until
from tests.harness.support import GEOMETRY, Engine

PULLS = 20
HALF = 96  # blocks per half: 1.5 MiB, a pull of a few milliseconds
PEER_TIMEOUT_MS = 1000


def test_pulls_survive_the_serving_peer_killed_at_random_points(etcd, daemons, tmp_path):
    common = ["--etcd", etcd.endpoint, "--lease-ttl", "2", "--host-cache-mb", "16"]
    puller = ["--peer-timeout-ms", str(PEER_TIMEOUT_MS), "--peer-backoff-s", "1"]
    servers = {
        name: daemons(name, host, *common)
        for name, host in (("a", "127.0.0.2"), ("c", "127.0.0.4"))
    }
    b = daemons("b", "127.0.0.3", *common, "--host-cache-mb", "64", *puller)
    eng_b = NodeAttachment(b.socket, GEOMETRY, remote=["host"])
    rng = random.Random(5)
    outcomes = []
    try:
        for n in range(PULLS):
            ks = eng_b.keys(list(range(10_000 * (n + 1), 10_000 * (n + 1) + 2 * HALF)))
            for name, part in (("a", ks[:HALF]), ("c", ks[HALF:])):
                eng = NodeAttachment(servers[name].socket, GEOMETRY)
                try:
                    made = Engine(HALF)
                    assert eng.store(made.kv, part, made.compute(part)) == HALF
                finally:
                    eng.close()
            until(lambda ks=ks: eng_b.lookup(ks) == Available(0, 2 * HALF), 10, "B never saw them")
            victim = rng.choice(sorted(servers))
            delay = rng.uniform(0, 0.03)
            killer = threading.Timer(delay, servers[victim].proc.kill)
            got = Engine(2 * HALF)
            got.fill(7.0)
            t0 = time.monotonic()
            killer.start()
            loaded, _ = eng_b.load(got.kv, ks, list(range(2 * HALF)))
            seconds = time.monotonic() - t0
            killer.join()
            servers[victim].proc.wait(10)
            host = "127.0.0.2" if victim == "a" else "127.0.0.4"
            back = ThreadPoolExecutor(1).submit(Daemon, tmp_path, victim, host, *common)
            outcomes.append((victim, round(delay * 1000, 1), loaded, round(seconds, 3)))
            # within the pull timeout (plus the local copy), never a hang
            assert seconds < 2 * PEER_TIMEOUT_MS / 1000 + 1, outcomes[-1]
            # what the engine got is a prefix, bit-exact, and nothing after it
            assert all(got.holds(k, i) for i, k in enumerate(ks[:loaded])), outcomes[-1]
            assert all(bool((layer[loaded:] == 7.0).all()) for layer in got.layers)
            # whatever B registered from the peers is right too
            own = NodeAttachment(b.socket, GEOMETRY)  # no remote tiers: B's own blocks only
            try:
                here = own.lookup(ks, ask_node=True).local
                check = Engine(2 * HALF)
                assert own.load(check.kv, ks, list(range(2 * HALF)))[0] == here
                assert all(check.holds(k, i) for i, k in enumerate(ks[:here]))
            finally:
                own.close()
            servers[victim] = back.result()  # restarted while B's blocks were checked
        # the kills really landed at different points: some pulls were cut short,
        # some finished first (a negative control on the timing)
        assert any(o[2] < 2 * HALF for o in outcomes), outcomes
        assert any(o[2] >= HALF for o in outcomes), outcomes
    finally:
        eng_b.close()
        for d in servers.values():
            d.stop()
