"""Which freed host memory the store hands back to the OS, and what that costs the steps that follow."""

from __future__ import annotations

import gc

import pytest
import torch

from lightning_tiercache import Tier
from lightning_tiercache.store import codec as codec_mod
from lightning_tiercache.store.tiers import disk as disk_mod
from lightning_tiercache.store.tiers.mapped import MAPPED_MIN_BYTES
from lightning_tiercache.store.tiers.trim import Trimmer

MiB = 1 << 20
needs_glibc = pytest.mark.skipif(not Trimmer().available, reason="malloc_trim is glibc's")


def _mapping(addr: int) -> tuple[int, int] | None:
    """The bounds of the mapping that holds ``addr``, if any."""
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= addr < hi:
                return lo, hi
    return None


@needs_glibc
def test_entries_freed_in_the_device_tier_trim_nothing(make_store):
    # What backward frees in place is what the plain run frees too: handing those pages back only makes the
    # next step fault them in again (with checkpointing and nothing to move, each trim cost about 100k page
    # faults a step on gpt6).
    store = make_store(device_bytes=64 * MiB, host_bytes=0)
    for _ in range(8):
        handles = [store.put(torch.ones(MiB // 4)) for _ in range(16)]
        for h in handles:
            store.free(h)
        assert not store.return_free_memory()
    assert store.stats()["memory_trims"] == 0


@needs_glibc
def test_ram_released_by_spill_writes_is_still_handed_back(make_store):
    store = make_store(device_bytes=2 * MiB, host_bytes=0)
    handles = [store.put(torch.ones(MiB // 4), tier=Tier.DISK) for _ in range(8)]
    store.settle()
    assert store.stats()["spills"] == 8
    assert store.stats()["memory_trims"] >= 1
    for h in handles:
        store.free(h)


@pytest.mark.skipif(not hasattr(__import__("mmap"), "MAP_ANONYMOUS"), reason="needs anonymous mappings")
@pytest.mark.parametrize("codec", ["none", "zstd", "byteplane"])
def test_a_read_record_is_its_own_mapping_until_its_last_view_dies(tmp_path, codec):
    # Note: [reads that leave the process]. A buffer from the C allocator sits in a heap (kept when freed) or,
    # when glibc mmaps it, behind the allocator's chunk header; a mapping of its own starts at the buffer.
    src = torch.randn(MAPPED_MIN_BYTES)  # 4 MiB of fp32
    path = tmp_path / "r.ltc"
    disk_mod.write_record(path, src, codec)
    got = disk_mod.read_record(path)
    assert torch.equal(got, src)
    addr = got.untyped_storage().data_ptr()
    # codec none hands out a view of the read buffer after the record's header; the others decode into one
    raw = path.read_bytes()
    offset = codec_mod.parse_header(raw, "r").header_nbytes if codec == "none" else 0
    bounds = _mapping(addr)
    assert bounds is not None and addr - bounds[0] == offset
    view = got[1000:2000]
    numpy_view = got.numpy()[5:9]
    del got
    gc.collect()
    assert _mapping(addr) == bounds  # views keep the mapping: no use after free
    assert torch.equal(view, src[1000:2000])
    assert (numpy_view == src[5:9].numpy()).all()
    del view, numpy_view
    gc.collect()
    assert _mapping(addr) is None  # the last view died: the memory left the process


@needs_glibc
def test_spill_reads_hand_back_what_backward_freed_meanwhile(make_store):
    # Note: [memory that leaves the process]: reloads land in mappings of their own, so backward's
    # temporaries grow the heap instead of reusing the activations' memory; each read's bytes count toward
    # the next trim.
    store = make_store(device_bytes=2 * MiB, host_bytes=0)
    handles = [store.put(torch.ones(MiB // 4), tier=Tier.DISK) for _ in range(8)]
    store.settle()
    after_writes = store.stats()["memory_trims"]
    for h in handles:
        store.get(h)
        store.free(h)
    store.settle()
    assert store.stats()["reads"] == 8
    assert store.stats()["memory_trims"] > after_writes
