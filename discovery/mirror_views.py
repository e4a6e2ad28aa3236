"""The mirror's read-only views: the shared holders of a block, and the
block locations as a mapping over the mirror's key table (discovery/mirror.py).
"""

from __future__ import annotations

from collections.abc import ItemsView, Iterator, Mapping, ValuesView
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from discovery.mirror import IndexMirror


class Holders(dict):
    """Which nodes hold a block, and in which tier: {node_id: Tier}. Shared by
    every block with the same holders and never changed in place (a change
    swaps in another one), so neighbouring blocks of a prompt usually point at
    one object, and a location costs a small id in the key table, not a dict."""

    __slots__ = ()


class Locations(Mapping[bytes, Holders]):
    """The mirror's block locations, read-only: {key: Holders}. Always the
    mirror's current table (also after `adopt`)."""

    __slots__ = ("_mirror",)

    def __init__(self, mirror: IndexMirror) -> None:
        self._mirror = mirror

    def __getitem__(self, key: bytes) -> Holders:
        i = self._mirror._table.get(key)
        if i is None:
            raise KeyError(key)
        return self._mirror._holders[i]  # type: ignore[return-value]

    def get(self, key: bytes, default: Holders | None = None) -> Holders | None:  # type: ignore[override]
        i = self._mirror._table.get(key)
        return default if i is None else self._mirror._holders[i]

    def __contains__(self, key: object) -> bool:
        return key in self._mirror._table

    def __len__(self) -> int:
        return len(self._mirror._table)

    def __iter__(self) -> Iterator[bytes]:
        return self._mirror._table.keys()

    def values(self) -> ValuesView[Holders]:
        return _Values(self)

    def items(self) -> ItemsView[bytes, Holders]:
        return _Items(self)


class _Values(ValuesView[Holders]):
    """Iterates the table's ids, not its keys: no key bytes are rebuilt."""

    def __iter__(self) -> Iterator[Holders]:
        m = self._mapping._mirror  # type: ignore[attr-defined]
        return map(m._holders.__getitem__, m._table.values())


class _Items(ItemsView[bytes, Holders]):
    def __iter__(self) -> Iterator[tuple[bytes, Holders]]:
        m = self._mapping._mirror  # type: ignore[attr-defined]
        holders = m._holders
        for key, i in m._table.items():
            yield key, holders[i]
