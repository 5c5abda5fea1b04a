"""The one cache policy of rgkern: a bounded mapping that evicts the least recently used entry.

Everything rgkern memoises in a process (shared geometries, device tables and cones, cone
plans, the tiles timed fastest on a GPU) lives in a :class:`BoundedCache` with a size fixed
where it is made. A hit makes an entry the most recent; storing into a full cache evicts the
least recent one. Entries are rebuilt on a miss, so eviction costs time, never correctness.
Not thread-safe, as the rest of the model state.

This module imports nothing from rgkern, so every layer may use it (the kernels too).
"""
from collections import OrderedDict
from typing import Callable, Hashable

__all__ = ["BoundedCache"]


class BoundedCache:
    """At most ``max_entries`` entries, least recently used evicted first."""

    def __init__(self, max_entries: int):
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self.max_entries = max_entries
        self._entries: OrderedDict = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def get(self, key: Hashable, default: object = None) -> object:
        """The entry at ``key`` (now the most recent), or ``default``."""
        if key not in self._entries:
            return default
        self._entries.move_to_end(key)
        return self._entries[key]

    def __iter__(self):
        return iter(list(self._entries))

    def __setitem__(self, key: Hashable, value) -> None:
        """Store ``value`` at ``key`` as the most recent entry, evicting the least recent if full."""
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def get_or_make(self, key: Hashable, make: Callable[[], object]) -> object:
        """The entry at ``key``, made by ``make()`` and stored on a miss."""
        if key in self._entries:
            return self.get(key)
        value = make()
        self[key] = value
        return value

    def items(self) -> list:
        """``(key, value)`` pairs, least recent first."""
        return list(self._entries.items())

    def clear(self) -> None:
        self._entries.clear()
