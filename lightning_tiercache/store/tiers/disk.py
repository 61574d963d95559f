"""The disk tier: a private spill folder of checksummed records, written atomically.

Folder names carry the owner's uid, pid and process start time, so a later process can tell a crashed
run's folder (owner gone) from a live one and remove it. Files are 0600 in a 0700 folder.
"""

from __future__ import annotations

import atexit
import errno
import logging
import os
import re
import shutil
import threading
import uuid
import weakref
from pathlib import Path

import psutil
import torch

from lightning_tiercache.errors import SpillCorruptError, SpillMissingError
from lightning_tiercache.store import codec as _codec
from lightning_tiercache.store.tiers.mapped import fresh_bytes

__all__ = ["DiskFullError", "SpillDir", "read_record", "remove_stale_spill_dirs", "write_record"]

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


def write_parts(path: Path, codec: str, tensor: torch.Tensor, parts: list[memoryview], aux: int) -> int:
    """Write already encoded ``parts`` of ``tensor`` as one record at ``path`` (temp file, then rename)."""
    raw = tensor.numel() * tensor.element_size()
    header = _codec.pack_header(codec, tensor.dtype, tuple(tensor.shape), raw, parts, aux)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
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
    where = str(path)
    try:
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            # torch.empty does not zero-fill (bytearray does): one pass over fresh memory, not two.
            buf = fresh_bytes(size)
            view = _codec.byte_view(buf)
            got = 0
            while got < size:
                n = f.readinto(view[got:])
                if not n:
                    break
                got += n
    except FileNotFoundError:
        raise SpillMissingError(f"{where}: spill file is missing (deleted while the store held it)") from None
    if got != size:
        raise SpillCorruptError(f"{where}: short read ({got} of {size} bytes)")
    rec = _codec.parse_header(view, where)
    payload = _codec.verify(view, rec, where)
    return _codec.decode_payload(rec, payload, where)


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

    def file(self, entry_id: int) -> Path:
        return self.path / f"{entry_id}.ltc"

    def close(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            self._finalizer()
