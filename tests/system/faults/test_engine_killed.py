"""An engine process SIGKILLed while it holds pins (a load it was copying, a
store it was filling): the node settles both leases when the connection
drops, and the blocks are evictable again."""

from __future__ import annotations

import subprocess
import sys

from kvbm.connector.attach import Available, NodeAttachment
from tests.harness.node_daemon import until
from tests.harness.support import GEOMETRY, Engine

HOLDER = """
import sys, time
from kvbm.connector.attach import NodeAttachment
from tests.harness.support import GEOMETRY
att = NodeAttachment(sys.argv[1], GEOMETRY)
ks = att.keys(list(range(6)))
att.link.call("load", {"keys": ks, "remote": []})
att.link.call("reserve", {"keys": att.keys([99])})
print("holding", flush=True)
time.sleep(600)
"""


def test_an_engine_killed_holding_pins_leaves_none(daemons):
    node = daemons("pins", "127.0.0.2", "--host-cache-mb", "2")
    eng = NodeAttachment(node.socket, GEOMETRY)
    try:
        ks = eng.keys(list(range(6)))
        made = Engine(6)
        assert eng.store(made.kv, ks, made.compute(ks)) == 6
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLDER, node.socket], stdout=subprocess.PIPE, text=True
        )
        try:
            assert holder.stdout.readline().strip() == "holding"
            assert eng.stats()["engine_leases"] == 2  # the control: the pins are there
        finally:
            holder.kill()
            holder.wait(10)
        until(lambda: eng.stats()["engine_leases"] == 0, 10, "the dead engine's leases stayed")
        # evictable again: a store of the whole tier's size pushes all six out
        fill = eng.keys(list(range(100, 100 + eng.num_slots)))
        big = Engine(len(fill))
        assert eng.store(big.kv, fill, big.compute(fill)) == len(fill)
        assert eng.lookup(ks, ask_node=True) == Available(0)
    finally:
        eng.close()
