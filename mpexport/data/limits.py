"""How much validation data mpexport reads into memory at once, and file names as text any stream can print.

A ``.npz`` file (or one shard of a directory) is read whole: its arrays are decompressed into memory, and the first
shard stays there for the whole run. So before an array is decompressed its size is known from its header, and a
file whose arrays would take more than :func:`memory_limit` bytes is refused with one line (a 4 MB "zip bomb" of
zeros would otherwise take 4 GB and more). The limit is ``MPEXPORT_MAX_ARRAY_BYTES`` when set (bytes, or with a
``K``/``M``/``G``/``T`` suffix, binary: ``8G``); otherwise :data:`DEFAULT_MAX_ARRAY_BYTES`, or half the memory
available (when first asked) where that is less (the first shard is held while a later one is read).
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path

from mpexport.base.errors import MpexportError

MAX_ARRAY_BYTES_ENV = "MPEXPORT_MAX_ARRAY_BYTES"
DEFAULT_MAX_ARRAY_BYTES = 4 * 1024**3
LIMIT_HINT = (f"split the data into a directory of smaller .npz shards (read one at a time), or set "
              f"{MAX_ARRAY_BYTES_ENV} (bytes, e.g. 16G) if this machine has the memory")
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class MemoryLimit:
    """A number of bytes and where it comes from (for the message that refuses a file over it)."""

    bytes: int
    source: str

    def text(self) -> str:
        """``4.0 GiB (the default)``."""
        return f"{size_text(self.bytes)} ({self.source})"


def memory_limit() -> MemoryLimit:
    """The most bytes one validation file (or shard) may take in memory once read: ``MPEXPORT_MAX_ARRAY_BYTES`` when
    set (a one-line error when it is not a positive size), else the smaller of :data:`DEFAULT_MAX_ARRAY_BYTES` and
    half the memory available when first asked (once per process)."""
    text = os.environ.get(MAX_ARRAY_BYTES_ENV, "").strip()
    if text:
        match = _SIZE.match(text)
        if not match or int(match.group(1)) <= 0:
            raise MpexportError(f"{MAX_ARRAY_BYTES_ENV}='{text}' is not a size in bytes", stage="val-data",
                                hint=f"e.g. {MAX_ARRAY_BYTES_ENV}=8G or {MAX_ARRAY_BYTES_ENV}=8589934592")
        return MemoryLimit(int(match.group(1)) * _UNITS[match.group(2).upper()], f"set by {MAX_ARRAY_BYTES_ENV}")
    return _default_limit()


@functools.lru_cache(maxsize=1)
def _default_limit() -> MemoryLimit:
    """Taken once per process: the first shard, once read, must not lower the limit for the next one."""
    available = available_memory()
    if available is not None and available // 2 < DEFAULT_MAX_ARRAY_BYTES:
        return MemoryLimit(available // 2, f"half the memory available; {MAX_ARRAY_BYTES_ENV} changes it")
    return MemoryLimit(DEFAULT_MAX_ARRAY_BYTES, f"the default; {MAX_ARRAY_BYTES_ENV} changes it")


def available_memory() -> int | None:
    """Bytes this process could still allocate: the smaller of the system's available memory and what the control
    group (a container's limit) leaves; None where neither says."""
    amounts = [amount for amount in (_meminfo_available(), _cgroup_left()) if amount is not None]
    return min(amounts) if amounts else None


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def _cgroup_left() -> int | None:
    """cgroup v2: memory.max less memory.current (None without a limit)."""
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        current = int((root / "memory.current").read_text().strip())
    except (OSError, ValueError):
        return None
    return max(0, int(limit) - current) if limit.isdigit() else None


def size_text(count: int) -> str:
    """Bytes for people: ``512 B``, ``3.5 MiB``, ``4.1 TiB``."""
    amount = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if amount < 1024 or unit == "PiB":
            return f"{count} B" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    return f"{count} B"


def shown(path: str | Path) -> str:
    """``path`` as text that any stream can print: bytes of the name that are not UTF-8 (which Python keeps as lone
    surrogates) written ``\\xff``."""
    text = str(path)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        try:
            return os.fsencode(text).decode("utf-8", "backslashreplace")
        except UnicodeError:
            return text.encode("utf-8", "backslashreplace").decode("utf-8")
