"""etcd SIGKILLed and restarted while three nodes publish: engines on every
node keep storing (small tiers, so blocks keep moving host -> disk -> out),
local hits go on while etcd is down, and once it is back every node's view of
every other node converges to what that node really holds, key by key."""

from __future__ import annotations

import itertools
import threading
import time

from kvbm.connector.attach import Available, NodeAttachment
from tests.harness.node_daemon import until
from tests.harness.support import GEOMETRY, Engine

NAMES = ("a", "b", "c")
PROMPT = 16  # blocks per store


class Churn(threading.Thread):
    """An engine storing fresh prompts on its node until told to stop."""

    def __init__(self, att: NodeAttachment, base: int) -> None:
        super().__init__(daemon=True)
        self.att, self.base = att, base
        self.stored: list = []
        self.local_hits_while_down = 0
        self.etcd_down = threading.Event()
        self.stopping = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for n in itertools.count():
                if self.stopping.is_set():
                    return
                ks = self.att.keys(
                    list(range(self.base + n * PROMPT, self.base + (n + 1) * PROMPT))
                )
                made = Engine(PROMPT)
                self.att.store(made.kv, ks, made.compute(ks))
                self.stored += ks
                if self.etcd_down.is_set():  # local serving goes on without etcd
                    got = Engine(PROMPT)
                    if self.att.load(got.kv, ks, list(range(PROMPT)))[0] == PROMPT:
                        self.local_hits_while_down += int(got.holds(ks[-1], PROMPT - 1))
                time.sleep(0.02)
        except BaseException as e:
            self.error = e


def views(atts: dict[str, NodeAttachment], stored: dict[str, list]) -> list[str]:
    """Every disagreement between what a node holds and what the others see."""
    wrong = []
    for owner, keys in stored.items():
        held = [atts[owner].lookup([k], ask_node=True).local == 1 for k in keys]
        for other in NAMES:
            if other == owner:
                continue
            seen = [_remote(atts[other].lookup([k], ask_node=True)) for k in keys]
            bad = sum(h != s for h, s in zip(held, seen, strict=True))
            if bad:
                wrong.append(f"{other} sees {bad} of {owner}'s {len(keys)} keys wrongly")
    return wrong


def _remote(a: Available) -> bool:
    return a.remote_host + a.remote_disk == 1


def test_mirrors_converge_after_etcd_is_killed_and_restarted_under_load(etcd, daemons, tmp_path):
    common = ["--etcd", etcd.endpoint, "--lease-ttl", "3", "--host-cache-mb", "2"]
    common += ["--disk-cache-mb", "4", "--disk-admit-min-uses", "1"]
    nodes = {
        name: daemons(name, f"127.0.0.{i + 2}", *common, "--disk-cache-dir", str(tmp_path / name))
        for i, name in enumerate(NAMES)
    }
    atts = {
        n: NodeAttachment(d.socket, GEOMETRY, remote=["host", "disk"]) for n, d in nodes.items()
    }
    churn = {
        n: Churn(NodeAttachment(d.socket, GEOMETRY), 1_000_000 * (i + 1))
        for i, (n, d) in enumerate(nodes.items())
    }
    try:
        for c in churn.values():
            c.start()
        time.sleep(1.5)  # publishing with etcd up
        etcd.kill()
        for c in churn.values():
            c.etcd_down.set()
        until(lambda: all(a.stats()["index"] == "etcd down" for a in atts.values()), 15, "etcd")
        time.sleep(2.0)  # publishing with etcd down: changes buffer
        for c in churn.values():
            c.etcd_down.clear()
        etcd.start()
        time.sleep(1.5)  # publishing with etcd back
        for c in churn.values():
            c.stopping.set()
            c.join(30)
            assert c.error is None, repr(c.error)
            assert c.local_hits_while_down > 0, "local serving stopped while etcd was down"
        for name, d in nodes.items():
            assert d.proc.poll() is None, f"{name} crashed"
        stored = {n: c.stored for n, c in churn.items()}
        assert all(len(s) > 10 * PROMPT for s in stored.values()), "too little churn"
        # the tiers overflowed: most keys are gone by now, which the views must show too
        for n, s in stored.items():
            assert sum(atts[n].lookup([k], ask_node=True).local for k in s) < len(s)
        until(lambda: views(atts, stored) == [], 20, "the views never converged")
        assert all(a.stats()["index"] == "etcd up" for a in atts.values())
        # and a peer's block really arrives through that view
        k = next(k for k in stored["a"] if atts["a"].lookup([k], ask_node=True).local == 1)
        got = Engine(1)
        assert atts["b"].lookup([k], ask_node=True) in (Available(0, 1), Available(0, 0, 1))
        assert atts["b"].load(got.kv, [k], [0])[0] == 1 and got.holds(k, 0)
    finally:
        for c in churn.values():
            c.stopping.set()
        for c in churn.values():
            c.join(30)
            c.att.close()
        for a in atts.values():
            a.close()
