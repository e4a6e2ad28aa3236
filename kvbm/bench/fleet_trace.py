"""A synthetic prompt trace and the tier changes it causes on one node, for
`kvbm bench index --nodes N`.

Each simulated node serves requests at a fixed rate of new blocks: a new
conversation (one of a few shared system prompts, then content of its own)
or the next turn of one of its conversations (the whole conversation so far,
then the answer and a new message). Its tiers are two LRU lists (G2, then
G3): a block used again comes back to G2, G2's coldest go to G3, G3's
coldest are gone. What comes out is what the node's BlockManager reports to
the index: key -> tier, or None (gone), in the order it happened, and each
key's anchor (kvbm/block_key.py), as the node keeps it.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass

from discovery.tier import Tier
from kvbm.block_key import GROUP_BLOCKS, KeySpace, anchor_of, seq_hash

SYSTEM_PROMPTS = 8


@dataclass(frozen=True)
class TraceShape:
    """Sizes in blocks (32 tokens each, say)."""

    system_blocks: tuple[int, int] = (16, 96)  # each system prompt's length, drawn once
    content_blocks: tuple[int, int] = (8, 96)  # a new conversation's own part
    turn_blocks: tuple[int, int] = (4, 24)  # an answer and the next message
    next_turn: float = 0.5  # share of requests that continue a conversation
    conversations: int = 64  # a node's open conversations (oldest dropped)
    host_blocks: int = 4096
    disk_blocks: int = 16384


class NodeTrace:
    def __init__(self, node: int, space: KeySpace, shape: TraceShape, seed: int = 0) -> None:
        self.node, self.space, self.shape = node, space, shape
        self.rng = random.Random(seed * 1_000_003 + node)
        sys_rng = random.Random(seed)  # the same system prompts on every node
        self.systems = [
            space.keys([(s + 1) << 48 | j for j in range(sys_rng.randint(*shape.system_blocks))])
            for s in range(SYSTEM_PROMPTS)
        ]
        self.host: OrderedDict[bytes, None] = OrderedDict()
        self.disk: OrderedDict[bytes, None] = OrderedDict()
        self.convs: list[list[bytes]] = []
        self.anchors: dict[bytes, int] = {}  # of every key held
        self._serial = 0
        self.created = 0  # blocks computed and stored (new to this node)

    def _fresh(self, n: int) -> list[bytes]:
        """Keys nobody has: this node's own content."""
        base = (SYSTEM_PROMPTS + 1 + self.node) << 48 | self._serial << 8
        self._serial += (n >> 8) + 1
        return self.space.keys(list(range(base, base + n)))

    def request(self, changes: dict[bytes, Tier | None]) -> int:
        """One request: its prompt's blocks used or stored; the tier changes
        go into `changes` (in order). Returns the blocks newly stored."""
        s, rng = self.shape, self.rng
        if self.convs and rng.random() < s.next_turn:
            conv = self.convs.pop(rng.randrange(len(self.convs)))
            prompt = conv + self._fresh(rng.randint(*s.turn_blocks))
        else:
            prompt = rng.choice(self.systems) + self._fresh(rng.randint(*s.content_blocks))
        self.convs.append(prompt)
        if len(self.convs) > s.conversations:
            self.convs.pop(0)
        new = 0
        for i, key in enumerate(prompt):
            if key in self.host:
                self.host.move_to_end(key)
                continue
            if key in self.disk:
                del self.disk[key]  # loaded from disk: back in G2
            else:
                new += 1
                self.anchors[key] = anchor_of(seq_hash(prompt[i - i % GROUP_BLOCKS]))
            self.host[key] = None
            changes.pop(key, None)
            changes[key] = Tier.HOST
        while len(self.host) > s.host_blocks:
            key, _ = self.host.popitem(last=False)
            self.disk[key] = None
            changes.pop(key, None)
            changes[key] = Tier.DISK
        while len(self.disk) > s.disk_blocks:
            key, _ = self.disk.popitem(last=False)
            del self.anchors[key]
            changes.pop(key, None)
            changes[key] = None
        self.created += new
        return new

    def held(self) -> int:
        return len(self.host) + len(self.disk)
