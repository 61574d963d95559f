"""Spill records read back from the page cache, and record files overwritten instead of recreated."""

from __future__ import annotations

import errno
import gc
import os
import sys

import pytest
import torch

from lightning_tiercache import Tier
from lightning_tiercache.errors import SpillMissingError
from lightning_tiercache.store.tiers import disk as disk_mod
from lightning_tiercache.store.tiers.mapped import MAPPED_MIN_BYTES, MAPS_FILES

MiB = 1 << 20
needs_maps = pytest.mark.skipif(
    not MAPS_FILES or not sys.platform.startswith("linux"), reason="reads /proc/self/maps of private file mappings"
)


def _inode_mapped_at(addr: int) -> int | None:
    """The inode of the file mapped at ``addr`` (0 for anonymous memory), or ``None`` when nothing is."""
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= addr < hi:
                return int(fields[4])
    return None


def _record(folder: disk_mod.SpillDir, entry_id: int, t: torch.Tensor) -> int:
    from lightning_tiercache.store.codec import encode_with

    codec, parts, aux = encode_with("none", t)
    return folder.write(entry_id, codec, t, parts, aux)


@pytest.fixture
def folder(tmp_path):
    d = disk_mod.SpillDir(tmp_path)
    yield d
    d.close()


@needs_maps
def test_a_large_record_reads_back_as_a_view_of_its_file(tmp_path):
    # Note: [reads from the page cache]: no fresh pages to fault in, no copy out of the page cache.
    src = torch.randn(MAPPED_MIN_BYTES // 2)  # 2 MiB
    path = tmp_path / "r.ltc"
    disk_mod.write_record(path, src, "none")
    got = disk_mod.read_record(path)
    assert torch.equal(got, src)
    assert _inode_mapped_at(got.data_ptr()) == os.stat(path).st_ino
    small = tmp_path / "s.ltc"
    disk_mod.write_record(small, torch.randn(1000), "none")
    assert _inode_mapped_at(disk_mod.read_record(small).data_ptr()) in (0, None)  # small: read into memory


@pytest.fixture
def read_back(tmp_path):
    """A 2 MiB record written and read back: (the source, the record's path, the tensor read)."""
    src = torch.randn(MAPPED_MIN_BYTES // 2)
    path = tmp_path / "r.ltc"
    disk_mod.write_record(path, src, "none")
    return src, path, disk_mod.read_record(path)


@needs_maps
def test_writing_to_a_tensor_read_back_leaves_its_record_alone(read_back):
    src, path, got = read_back
    got.mul_(2)  # a private mapping: the pages written are copies
    assert torch.equal(got, src * 2)
    assert torch.equal(disk_mod.read_record(path), src)


@needs_maps
def test_a_record_read_back_outlives_its_file(read_back):
    src, path, got = read_back
    path.unlink()
    gc.collect()
    assert torch.equal(got, src)


def test_a_retired_record_file_is_overwritten_by_the_next_record_of_its_size(folder):
    # Note: [recycled record files]: the page-cache pages of the file are reused, not freed and allocated.
    a, b = torch.randn(MiB), torch.randn(MiB)
    _record(folder, 1, a)
    inode = os.stat(folder.file(1)).st_ino
    assert torch.equal(folder.read(1), a)
    gc.collect()
    folder.retire(1)
    assert not folder.file(1).exists()
    _record(folder, 2, b)
    assert folder.reused == 1
    assert os.stat(folder.file(2)).st_ino == inode
    assert torch.equal(folder.read(2), b)
    assert not [p for p in folder.path.iterdir() if p.name.startswith(".")]  # no temp or kept file left


@needs_maps
def test_a_file_is_not_overwritten_while_a_tensor_still_views_its_record(folder):
    a, b, c = torch.randn(MiB), torch.randn(MiB), torch.randn(MiB)
    _record(folder, 1, a)
    got = folder.read(1)  # a view of the file's pages
    view = got[10:20]
    folder.retire(1)
    _record(folder, 2, b)  # same size: it must not take the file ``got`` still maps
    assert folder.reused == 0
    assert torch.equal(got, a)
    del got
    gc.collect()
    _record(folder, 3, c)
    assert folder.reused == 0  # ``view`` still holds the mapping
    assert torch.equal(view, a[10:20])
    del view
    gc.collect()
    _record(folder, 4, c)
    assert folder.reused == 1  # the last view died: the file came free
    assert torch.equal(folder.read(4), c)
    assert torch.equal(folder.read(2), b)


def test_kept_files_never_take_more_than_the_live_records_took(folder):
    for i in range(4):
        _record(folder, i, torch.randn(MiB))
    peak = sum(p.stat().st_size for p in folder.path.iterdir())
    for i in range(4):
        folder.retire(i)
    for i in range(4, 7):  # another size: each new file removes a kept one to make room
        _record(folder, i, torch.randn(MiB - 1024))
    assert sum(p.stat().st_size for p in folder.path.iterdir()) <= peak
    assert folder.kept_removed == 3
    assert folder.reused == 0


def test_a_full_disk_removes_the_kept_files_before_a_write_fails(folder, monkeypatch):
    for i in range(2):
        _record(folder, i, torch.randn(MiB))
    for i in range(2):
        folder.retire(i)
    real_write = os.write
    kept = [p for p in folder.path.iterdir() if p.name.startswith(".kept-")]
    assert len(kept) == 2

    def write(fd, buf):
        if any(p.exists() for p in kept):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, buf)

    monkeypatch.setattr(disk_mod.os, "write", write)
    t = torch.randn(MiB // 2)  # no kept file of its size: a new file, which finds the disk full
    _record(folder, 9, t)
    assert folder.kept_removed == 2
    assert torch.equal(folder.read(9), t)


def test_a_record_retired_during_its_read_is_missing_not_someone_elses(folder, monkeypatch):
    _record(folder, 1, torch.randn(MiB))
    real_fstat = os.fstat

    def fstat(fd):  # retire the record between the read's open and its count
        st = real_fstat(fd)
        monkeypatch.setattr(disk_mod.os, "fstat", real_fstat)
        folder.retire(1)
        _record(folder, 2, torch.randn(MiB))  # takes the retired file
        return st

    monkeypatch.setattr(disk_mod.os, "fstat", fstat)
    with pytest.raises(SpillMissingError):
        folder.read(1)


def test_the_store_reuses_spill_files_across_steps_and_reads_back_exactly(make_store):
    store = make_store(device_bytes=2 * MiB, host_bytes=0, codec="none")
    for _ in range(3):
        values = [torch.randn(MiB // 4) for _ in range(6)]
        handles = [store.put(v, tier=Tier.DISK) for v in values]
        store.settle()
        for v, h in zip(values, handles, strict=True):
            assert torch.equal(store.get(h), v)
            store.free(h)
        store.settle()
    st = store.stats()
    assert st["spills"] == 18
    assert st["spill_files_reused"] == 12  # every write after the first step finds a file of its size
