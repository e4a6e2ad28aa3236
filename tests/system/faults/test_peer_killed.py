"""The serving peer SIGKILLed at random points of 20 pulls. Two serving nodes
each hold half of a prompt, B pulls the whole prompt from both; one of the
two dies at a random moment of each pull (and restarts while other serving
nodes take the next pulls). Every pull returns within its timeout, every
block B hands its engine is bit-exact, and every block B registered along
the way is too (read back from B alone afterwards)."""

from __future__ import annotations

import contextlib
import random
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from kvbm.connector.attach import Available, NodeAttachment
from tests.harness.node_daemon import Daemon, until
from tests.harness.support import GEOMETRY, Engine

PULLS = 20
HALF = 96  # blocks per half: 1.5 MiB, a pull of a few milliseconds
PEER_TIMEOUT_MS = 1000
# Serving peers, more than the two a pull needs: a killed one restarts in the
# background (about 3 s, its old lease expiring) while the next pulls are
# served by the others, instead of every pull waiting for its restart.
SERVERS = {"a": "127.0.0.2", "c": "127.0.0.4", "d": "127.0.0.5", "e": "127.0.0.6"}


def test_pulls_survive_the_serving_peer_killed_at_random_points(etcd, daemons, tmp_path):
    common = ["--etcd", etcd.endpoint, "--lease-ttl", "2", "--host-cache-mb", "16"]
    puller = ["--peer-timeout-ms", str(PEER_TIMEOUT_MS), "--peer-backoff-s", "1"]
    ready = {name: daemons(name, host, *common) for name, host in SERVERS.items()}
    coming: dict[str, Future] = {}  # restarting
    restarts = ThreadPoolExecutor(len(SERVERS))
    b = daemons("b", "127.0.0.3", *common, "--host-cache-mb", "64", *puller)
    eng_b = NodeAttachment(b.socket, GEOMETRY, remote=["host"])
    rng = random.Random(5)
    outcomes = []
    try:
        for n in range(PULLS):
            while len(ready) < 2:
                wait(list(coming.values()), return_when=FIRST_COMPLETED)
                for name in [name for name, back in coming.items() if back.done()]:
                    ready[name] = coming.pop(name).result()
            pair = rng.sample(sorted(ready), 2)  # the first half's holder, the second's
            ks = eng_b.keys(list(range(10_000 * (n + 1), 10_000 * (n + 1) + 2 * HALF)))
            for name, part in zip(pair, (ks[:HALF], ks[HALF:]), strict=True):
                eng = NodeAttachment(ready[name].socket, GEOMETRY)
                try:
                    made = Engine(HALF)
                    assert eng.store(made.kv, part, made.compute(part)) == HALF
                finally:
                    eng.close()
            until(lambda ks=ks: eng_b.lookup(ks) == Available(0, 2 * HALF), 10, "B never saw them")
            victim = rng.choice(pair)
            delay = rng.uniform(0, 0.03)
            killer = threading.Timer(delay, ready[victim].proc.kill)
            got = Engine(2 * HALF)
            got.fill(7.0)
            t0 = time.monotonic()
            killer.start()
            loaded, _ = eng_b.load(got.kv, ks, list(range(2 * HALF)))
            seconds = time.monotonic() - t0
            killer.join()
            ready.pop(victim).proc.wait(10)
            coming[victim] = restarts.submit(Daemon, tmp_path, victim, SERVERS[victim], *common)
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
        # the kills really landed at different points: some pulls were cut short,
        # some finished first (a negative control on the timing)
        assert any(o[2] < 2 * HALF for o in outcomes), outcomes
        assert any(o[2] >= HALF for o in outcomes), outcomes
    finally:
        eng_b.close()
        restarts.shutdown(wait=True)
        for back in coming.values():
            with contextlib.suppress(Exception):
                back.result().stop()
        for d in ready.values():
            d.stop()
