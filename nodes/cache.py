"""A least-recently-used cache for what nodes load from disk (LoRAs, reward models), bounded in
entries and, optionally, in bytes."""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Generic, Hashable, TypeVar

from ..blend.memory import memory_budget  # noqa: F401  (re-exported: the nodes' caches use it)

V = TypeVar("V")


class LruCache(Generic[V]):
    """At most ``size`` entries and, with ``sizeof``, at most ``max_bytes`` in total; the least
    recently used entries go first, and the newest entry always stays (even when it alone is larger)."""

    def __init__(self, size: int, max_bytes: int | None = None, sizeof: Callable[[V], int] | None = None):
        self.size = size
        self.max_bytes = max_bytes
        self._sizeof = sizeof
        self._items: "OrderedDict[Hashable, tuple[V, int]]" = OrderedDict()
        self.bytes = 0

    def get(self, key: Hashable, make: Callable[[], V]) -> V:
        """The value for ``key``, made with ``make()`` on a miss."""
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key][0]
        value = make()
        nbytes = self._sizeof(value) if self._sizeof is not None else 0
        self._items[key] = (value, nbytes)
        self.bytes += nbytes
        while len(self._items) > 1 and (len(self._items) > self.size or
                                        (self.max_bytes is not None and self.bytes > self.max_bytes)):
            _, (_, dropped) = self._items.popitem(last=False)
            self.bytes -= dropped
        return value

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0
