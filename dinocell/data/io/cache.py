"""Caches for streamed data: an in-memory LRU of decoded fields and an optional on-disk copy of fetched files."""

from __future__ import annotations

import os
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class LRUCache(Generic[K, V]):
    """Thread-safe least-recently-used map holding at most `capacity` entries (0 disables it)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"cache capacity {capacity} must be >= 0")
        self.capacity = capacity
        self._items: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: K) -> V | None:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
            self.misses += 1
            return None

    def put(self, key: K, value: V) -> None:
        if self.capacity == 0:
            return
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class DiskCache:
    """Fetched files kept under `root/<bucket>/<key>`; writes are atomic (temp file + rename), no eviction."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, bucket: str, key: str) -> Path:
        return self.root / bucket / key

    def get(self, bucket: str, key: str) -> bytes | None:
        try:
            return self.path(bucket, key).read_bytes()
        except FileNotFoundError:
            return None

    def put(self, bucket: str, key: str, data: bytes) -> None:
        target = self.path(bucket, key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".part-")
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, target)
