"""Numbers by name in memory one process writes and any process reads: the figures of ``--workers``.

prometheus_client's multiprocess idea, without its naming rules: each worker keeps its counters in a
file of its own under a directory the workers share, appending a name the first time it is used and
then adding to its 8-byte value in place, so a request pays an index and an add, nothing more. A
scrape, in whichever worker it lands, sums the files of every worker (:func:`read_all`), those of
workers that ended included, so counters never go back.

The file: an 8-byte count of the bytes in use, then records of a 4-byte name length, the UTF-8 name
padded to 8 bytes and the value, a little-endian float64. A record is written whole before the count
covers it, so a reader sees whole records only.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
from collections import Counter
from collections.abc import Iterator, MutableMapping
from pathlib import Path

SIZE = 1 << 16  # names are fixed in code (routes, error types, buckets): a few hundred at most
_USED = struct.Struct("<Q")
_LENGTH = struct.Struct("<I")


class Slots(MutableMapping[str, float]):
    """``slots[name] += 1`` in a file of ``path`` (in memory alone without one); one writing process.

    Threads of that process may write different names at once; one name has one writing thread.
    """

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else None
        if self.path is None:
            self._map = mmap.mmap(-1, SIZE)
        else:
            with open(self.path, "w+b") as file:
                file.truncate(SIZE)
                self._map = mmap.mmap(file.fileno(), SIZE)
        self._values = memoryview(self._map).cast("d")
        self._index: dict[str, int] = {}
        self._used = _USED.size
        self._append = threading.Lock()

    def _slot(self, name: str) -> int:
        with self._append:
            if name in self._index:
                return self._index[name]
            encoded = name.encode()
            start = self._used + _LENGTH.size + len(encoded)
            start += -start % 8
            if start + 8 > SIZE:
                raise RuntimeError(f"{self.path or 'slots'}: no room for {name!r} (over {SIZE:,} bytes of names)")
            _LENGTH.pack_into(self._map, self._used, len(encoded))
            self._map[self._used + _LENGTH.size : self._used + _LENGTH.size + len(encoded)] = encoded
            self._values[start // 8] = 0.0
            self._used = start + 8
            _USED.pack_into(self._map, 0, self._used)
            self._index[name] = start // 8
            return start // 8

    def __getitem__(self, name: str) -> float:
        slot = self._index.get(name)
        return 0.0 if slot is None else self._values[slot]

    def __setitem__(self, name: str, value: float) -> None:
        slot = self._index.get(name)
        self._values[self._slot(name) if slot is None else slot] = value

    def add(self, name: str, value: float = 1.0) -> None:
        """``slots[name] += value`` with one index lookup."""
        slot = self._index.get(name)
        if slot is None:
            slot = self._slot(name)
        self._values[slot] += value

    def __delitem__(self, name: str) -> None:
        raise TypeError("a slot is never removed: its file is read by other processes")

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._index))

    def __len__(self) -> int:
        return len(self._index)


def read(path: str | Path) -> dict[str, float]:
    """The names and values of one slots file, as they stand."""
    data = Path(path).read_bytes()
    if len(data) < _USED.size:
        return {}
    (used,) = _USED.unpack_from(data, 0)
    values, at = {}, _USED.size
    while at < min(used, len(data)):
        (length,) = _LENGTH.unpack_from(data, at)
        name = data[at + _LENGTH.size : at + _LENGTH.size + length].decode()
        at += _LENGTH.size + length
        at += -at % 8
        (values[name],) = struct.unpack_from("<d", data, at)
        at += 8
    return values


def read_all(directory: str | Path, gauges: tuple[str, ...] = ()) -> Counter[str]:
    """Every slots file under ``directory`` (``PID.slots``) summed name by name.

    Counters sum over every file, of workers that ended too; ``gauges`` (values that stand for a
    moment, such as a queue's length) only over the files of processes still running.
    """
    total: Counter[str] = Counter()
    for path in sorted(Path(directory).glob("*.slots")):
        values = read(path)
        if gauges and not _running(path.stem):
            values = {name: value for name, value in values.items() if name not in gauges}
        total.update(values)
    return total


def _running(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        pass
    return True
