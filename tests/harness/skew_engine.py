"""An engine of another release, for the version-skew tests: the cheap
engine of tests/harness/support.py (block bytes a function of the key)
attached to a node with `NodeAttachment`, run by tests/harness/old_tree.py
under the old tree. It uses only what both releases have, so the kvbm it
talks with is the tree's on PYTHONPATH.

Run as `python -P tests/harness/skew_engine.py ORDER_JSON`, ORDER being
{"socket", "remote": [tiers], "store": [sequence hashes], "load": [sequence
hashes]}: attach, store `store`'s blocks, wait (10 s at most) until the
node could serve all of `load`, load them and check every byte. Prints one
JSON line: {"kvbm": the kvbm module's path, "error": the attach's error or
null, "stored", "available": the lookup's total, "loaded", "sources",
"exact"}.
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    import kvbm
    from kvbm.connector.attach import NodeAttachment, NodeError
    from tests.harness.support import GEOMETRY, Engine

    order = json.loads(sys.argv[1])
    answer: dict = {"kvbm": kvbm.__file__, "error": None, "stored": 0, "loaded": 0}
    try:
        att = NodeAttachment(order["socket"], GEOMETRY, remote=order.get("remote", []))
    except NodeError as e:  # refused: an engine runs without its node, recomputing
        answer["error"] = str(e)
        print(json.dumps(answer), flush=True)
        return
    try:
        store = att.keys(order.get("store", []))
        if store:
            made = Engine(len(store))
            answer["stored"] = att.store(made.kv, store, made.compute(store))
        load = att.keys(order.get("load", []))
        deadline = time.monotonic() + 10
        while att.lookup(load, ask_node=True).total < len(load) and time.monotonic() < deadline:
            time.sleep(0.1)
        answer["available"] = att.lookup(load, ask_node=True).total
        if load:
            got = Engine(len(load))
            loaded, sources = att.load(got.kv, load, list(range(len(load))))
            answer["loaded"], answer["sources"] = loaded, sources
            answer["exact"] = all(got.holds(k, i) for i, k in enumerate(load[:loaded]))
    finally:
        att.close()
    print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
