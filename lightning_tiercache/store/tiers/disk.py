"""The disk tier: a private spill folder of checksummed records, written atomically.

Folder names carry the owner's uid, pid and process start time, so a later process can tell a crashed
run's folder (owner gone) from a live one and remove it. Files are 0600 in a 0700 folder.

Note: [recycled record files]
    A new file's pages are new page-cache pages, and a removed file's pages are freed: on a 2-core VM that
    allocation and freeing, not the copy, is most of a write's cost (0.50 s of a GEMM thread's time per GB
    written into new files, 0.08 s per GB overwriting existing ones; probe of 2026-12-02). Training spills
    the same sizes every step, so :class:`SpillDir` keeps the files of records that left the disk tier and
    overwrites one of exactly the new record's size (temporary name, whole record written, then renamed into
    place: a reader still never sees a partial record). A file whose old record is still mapped by a tensor
    (Note: [reads from the page cache] in :mod:`lightning_tiercache.store.tiers.mapped`) waits until the last
    such mapping is gone: overwriting it would change that tensor. Kept files never make the folder larger
    than the most its live records ever took; on a full disk they are removed before a write fails.
"""

from __future__ import annotations

import atexit
import errno
import io
import logging
import mmap
import os
import re
import shutil
import threading
import uuid
import weakref
from collections.abc import Callable
from pathlib import Path

import psutil
import torch

from lightning_tiercache.errors import SpillCorruptError, SpillMissingError
from lightning_tiercache.store import codec as _codec
from lightning_tiercache.store.tiers.mapped import MAPPED_MIN_BYTES, MAPS_FILES, file_bytes, fresh_bytes

__all__ = ["DiskFullError", "SpillDir", "read_record", "remove_stale_spill_dirs", "write_parts", "write_record"]

log = logging.getLogger(__name__)
_PREFIX = "lightning_tiercache"
_NAME_RE = re.compile(rf"^{_PREFIX}-(\d+)-(\d+)-(\d+)-[0-9a-f]+$")


class DiskFullError(OSError):
    """Raised internally when a write hits ENOSPC/EDQUOT; the store keeps the entry a tier up."""


def _uid() -> int:
    return os.getuid() if hasattr(os, "getuid") else 0


def _start_ticks(pid: int) -> int:
    try:
        return int(psutil.Process(pid).create_time() * 100)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return -1


def remove_stale_spill_dirs(parent: Path) -> list[Path]:
    """Remove spill folders under ``parent`` left by this user's processes that are no longer alive."""
    removed: list[Path] = []
    try:
        children = list(parent.iterdir())
    except OSError:
        return removed
    for child in children:
        m = _NAME_RE.match(child.name)
        if not m or int(m.group(1)) != _uid():
            continue
        try:
            if child.is_symlink() or child.stat().st_uid != _uid():
                continue
        except OSError:
            continue
        pid, ticks = int(m.group(2)), int(m.group(3))
        if _start_ticks(pid) == ticks:
            continue  # its owner still runs
        shutil.rmtree(child, ignore_errors=True)
        removed.append(child)
        log.info("removed spill folder %s left by a process that is gone (pid %d)", child, pid)
    return removed


def write_record(path: Path, tensor: torch.Tensor, codec: str, level: int = 1) -> int:
    """Encode ``tensor`` and write it to ``path`` atomically (0600). Returns the bytes written.

    Raises:
        DiskFullError: no space or quota left; nothing is left behind.
        OSError: any other write failure; nothing is left behind.
    """
    used, parts, aux = _codec.encode_with(codec, tensor, level)
    return write_parts(path, used, tensor, parts, aux)


def write_parts(
    path: Path,
    codec: str,
    tensor: torch.Tensor,
    parts: list[memoryview],
    aux: int,
    reuse: Callable[[int], Path | None] | None = None,
) -> int:
    """Write already encoded ``parts`` of ``tensor`` as one record at ``path`` (temp file, then rename).

    Args:
        reuse: given the record's size in bytes, an existing file of exactly that size to overwrite instead of
            creating one (Note: [recycled record files]), or ``None``.
    """
    raw = tensor.numel() * tensor.element_size()
    header = _codec.pack_header(codec, tensor.dtype, tuple(tensor.shape), raw, parts, aux)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    old = reuse(len(header) + sum(p.nbytes for p in parts)) if reuse is not None else None
    try:
        fd = -1
        if old is not None:
            try:
                os.replace(old, tmp)
                fd = os.open(tmp, os.O_WRONLY | getattr(os, "O_BINARY", 0))
            except FileNotFoundError:  # removed meanwhile: write a new file
                fd = -1
            except OSError:
                tmp.unlink(missing_ok=True)
                raise
        if fd < 0:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
        try:
            written = 0
            for buf in (memoryview(header), *parts):
                while buf.nbytes:
                    n = os.write(fd, buf)
                    written += n
                    buf = buf[n:]
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.replace(tmp, path)
    except OSError as err:
        if err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
            raise DiskFullError(err.errno, f"no space left writing {path}") from err
        raise
    return written


def read_record(path: Path) -> torch.Tensor:
    """Read, verify and decode a record. Never returns a tensor whose checksum did not match.

    Raises:
        SpillMissingError: the file is gone.
        SpillCorruptError: the header, length or checksum is wrong.
    """
    try:
        with open(path, "rb", buffering=0) as f:
            return _read_open(f, str(path))
    except FileNotFoundError:
        raise _missing(path) from None


def _missing(path: Path) -> SpillMissingError:
    return SpillMissingError(f"{path}: spill file is missing (deleted while the store held it)")


def _read_open(f: io.FileIO, where: str, mapped: Callable[[mmap.mmap], None] | None = None) -> torch.Tensor:
    """Read, verify and decode the record open in ``f``.

    Args:
        mapped: called with the mapping when the record was mapped rather than read (Note: [reads from the
            page cache]); the returned tensor may view it.
    """
    size = os.fstat(f.fileno()).st_size
    got_map = _map(f.fileno(), size)
    if got_map is not None:  # Note: [reads from the page cache]
        buf, mapping = got_map
        if mapped is not None:
            mapped(mapping)
        view, got = _codec.byte_view(buf), size
    else:
        # torch.empty does not zero-fill (bytearray does): one pass over fresh memory, not two.
        buf = fresh_bytes(size)
        view = _codec.byte_view(buf)
        got = _codec.fill(f.readinto, view)
    if got != size:
        raise SpillCorruptError(f"{where}: short read ({got} of {size} bytes)")
    rec = _codec.parse_header(view, where)
    payload = _codec.verify(view, rec, where)
    return _codec.decode_payload(rec, payload, where)


def _map(fd: int, size: int) -> tuple[torch.Tensor, mmap.mmap] | None:
    """The record open at ``fd`` as a private mapping, or ``None`` where it is small or cannot be mapped."""
    if size < MAPPED_MIN_BYTES or not MAPS_FILES:
        return None
    try:
        return file_bytes(fd, size)
    except OSError:  # a file system without mappings: read it
        return None


class SpillDir:
    """This process's private spill folder. Removed on :meth:`close` and at interpreter exit."""

    def __init__(self, parent: Path) -> None:
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale_spill_dirs(parent)
        pid = os.getpid()
        name = f"{_PREFIX}-{_uid()}-{pid}-{_start_ticks(pid)}-{uuid.uuid4().hex[:8]}"
        self.path = parent / name
        self.path.mkdir(mode=0o700)
        os.chmod(self.path, 0o700)  # mkdir's mode is masked by umask
        self._closed = threading.Event()
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.path), True)
        atexit.register(self._finalizer)
        # Note: [recycled record files]. Reentrant: a mapping's finalizer may run wherever its last view dies.
        self._lock = threading.RLock()
        self._free: dict[int, list[Path]] = {}  # record size -> kept files nothing maps any more
        self._waiting: dict[int, tuple[Path, int]] = {}  # inode -> (kept file, size) while still mapped
        self._views: dict[int, int] = {}  # inode -> live mappings of its record
        self._live_bytes = 0  # records written and not retired
        self._kept_bytes = 0  # files in _free and _waiting
        self._peak_bytes = 0
        self.reused = 0
        self.kept_removed = 0

    def file(self, entry_id: int) -> Path:
        return self.path / f"{entry_id}.ltc"

    def write(self, entry_id: int, codec: str, tensor: torch.Tensor, parts: list[memoryview], aux: int) -> int:
        """Write a record for ``entry_id``, overwriting a kept file of its size when there is one.

        Raises:
            DiskFullError: no space left even after removing the kept files; nothing is left behind.
            OSError: any other write failure; nothing is left behind.
        """
        try:
            written = write_parts(self.file(entry_id), codec, tensor, parts, aux, reuse=self._take)
        except DiskFullError:
            if not self._drop_kept():
                raise
            written = write_parts(self.file(entry_id), codec, tensor, parts, aux)
        with self._lock:
            self._live_bytes += written
            self._peak_bytes = max(self._peak_bytes, self._live_bytes)
        return written

    def read(self, entry_id: int) -> torch.Tensor:
        """Read ``entry_id``'s record (see :func:`read_record`), tracking a mapping the tensor may view.

        The file counts as mapped from before it is read until the last view of its mapping died, so a
        :meth:`retire` meanwhile keeps it from being overwritten (Note: [recycled record files]).
        """
        path = self.file(entry_id)
        try:
            with open(path, "rb", buffering=0) as f:
                inode = os.fstat(f.fileno()).st_ino
                with self._lock:
                    self._views[inode] = self._views.get(inode, 0) + 1
                try:
                    if os.stat(path).st_ino != inode:  # retired between the open and the count: it may be
                        raise FileNotFoundError(path)  # overwritten by now
                    return _read_open(f, str(path), lambda m: self._mapped(inode, m))
                finally:
                    self._unmapped(inode)  # the read's own count; a mapping keeps its own
        except FileNotFoundError:
            raise _missing(path) from None

    def retire(self, entry_id: int) -> None:
        """``entry_id``'s record left the disk tier: keep its file for a later write of its size, or remove it."""
        path = self.file(entry_id)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return
        with self._lock:
            self._live_bytes -= st.st_size
            kept = path.with_name(f".kept-{uuid.uuid4().hex[:12]}")
            try:
                os.replace(path, kept)
            except OSError:
                path.unlink(missing_ok=True)
                return
            self._kept_bytes += st.st_size
            if self._views.get(st.st_ino):
                self._waiting[st.st_ino] = (kept, st.st_size)
            else:
                self._free.setdefault(st.st_size, []).append(kept)

    def _mapped(self, inode: int, mapping: mmap.mmap) -> None:
        with self._lock:
            self._views[inode] = self._views.get(inode, 0) + 1
        weakref.finalize(mapping, self._unmapped, inode).atexit = False

    def _unmapped(self, inode: int) -> None:
        """The last view of one mapping of ``inode`` died (any thread)."""
        with self._lock:
            left = self._views.pop(inode, 1) - 1
            if left:
                self._views[inode] = left
                return
            waiting = self._waiting.pop(inode, None)
            if waiting is not None:
                self._free.setdefault(waiting[1], []).append(waiting[0])

    def _take(self, size: int) -> Path | None:
        """A kept file of exactly ``size`` bytes to overwrite, or ``None``; makes room for a new file otherwise."""
        with self._lock:
            files = self._free.get(size)
            if files:
                self._kept_bytes -= size
                self.reused += 1
                got = files.pop()
                if not files:
                    del self._free[size]
                return got
            # A new file: never hold more than the most the live records ever took.
            while self._free and self._kept_bytes + self._live_bytes + size > self._peak_bytes:
                old_size = max(self._free, key=lambda k: len(self._free[k]))  # the size least likely missed
                files = self._free[old_size]
                files.pop().unlink(missing_ok=True)
                self._kept_bytes -= old_size
                self.kept_removed += 1
                if not files:
                    del self._free[old_size]
        return None

    def _drop_kept(self) -> bool:
        """Remove every kept file nothing maps (for a full disk); returns whether any was removed."""
        with self._lock:
            files = [(size, f) for size, fs in self._free.items() for f in fs]
            self._free.clear()
            for size, f in files:
                f.unlink(missing_ok=True)
                self._kept_bytes -= size
            self.kept_removed += len(files)
        return bool(files)

    def close(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            self._finalizer()
