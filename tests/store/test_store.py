"""TierStore behaviour: round trips through every tier and codec, budgets, pressure, failures, cleanup."""

from __future__ import annotations

import errno
import os
import stat
import threading
import warnings

import pytest
import torch

from lightning_tiercache import (
    EntryEvictedError,
    EntryNotFoundError,
    Kind,
    SpillCorruptError,
    SpillMissingError,
    StoreClosedError,
    Tier,
    TierConfig,
    TierStore,
)
from lightning_tiercache.store.codec import _DTYPE_TO_CODE
from lightning_tiercache.store.tiers import disk as disk_mod

CODECS = ("none", "zstd", "byteplane", "auto")
KiB = 1024


def _sample(dtype: torch.dtype, shape: tuple[int, ...] = (33, 17)) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape) > 0.5
    if dtype.is_complex:
        return torch.randn(shape, dtype=dtype)
    if dtype.is_floating_point:
        base = torch.randn(shape) * 3
        if dtype.itemsize == 1:  # float8: go through float32 with a clamp to the format's range
            return base.clamp(-200, 200).to(dtype)
        return base.to(dtype)
    if dtype in (torch.uint16, torch.uint32, torch.uint64):
        return torch.randint(0, 2**15, shape, dtype=torch.int64).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -(2**31)), min(info.max, 2**31 - 1), shape, dtype=torch.int64).to(dtype)


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equality of values *and* bits (NaN payloads, -0.0), which torch.equal does not check."""
    if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def _spilling(make_store, codec: str = "none", **kw) -> TierStore:
    kw.setdefault("device_bytes", 0)
    kw.setdefault("host_bytes", 0)
    kw.setdefault("disk_bytes", "1GiB")
    return make_store(codec=codec, **kw)


STORABLE = [d for d in _DTYPE_TO_CODE if d not in (torch.complex32,) and "float4" not in str(d)]


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("dtype", STORABLE, ids=str)
def test_every_dtype_round_trips_bit_exactly_through_disk(make_store, codec, dtype):
    store = _spilling(make_store, codec)
    t = _sample(dtype)
    h = store.put(t)
    assert store.where(h) is Tier.DISK
    store.settle()
    out = store.get(h)
    assert _bits_equal(out, t)


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.tensor(3.5, dtype=torch.bfloat16),  # 0-d
        lambda: torch.empty(0, 7, dtype=torch.float16),  # empty
        lambda: torch.randn(40, 30).t(),  # non-contiguous
        lambda: torch.randn(8, 8, 8)[:, ::2, 1:],  # strided view
        lambda: torch.tensor([float("nan"), -0.0, float("inf"), -float("inf")]),  # special values
        lambda: torch.full((513,), float("nan")).view(torch.int32).add_(7).view(torch.float32),  # NaN payloads
    ],
    ids=["0d", "empty", "transposed", "strided", "specials", "nan-payload"],
)
def test_layouts_round_trip_through_disk(make_store, codec, make):
    store = _spilling(make_store, codec)
    t = make()
    h = store.put(t)
    store.settle()
    assert _bits_equal(store.get(h), t.contiguous())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8, torch.bool], ids=str)
@pytest.mark.parametrize("tier", [Tier.DEVICE, Tier.HOST, Tier.DISK])
def test_get_returns_the_value_from_each_tier(make_store, tier, dtype):
    store = make_store(device_bytes="1MiB", host_bytes="1MiB", disk_bytes="1MiB")
    t = _sample(dtype, (64, 64)).t()
    h = store.put(t, tier=tier)
    store.settle()
    assert store.where(h) is tier
    assert _bits_equal(store.get(h).contiguous(), t.contiguous())
    assert store.where(h) is Tier.DEVICE  # a get brings it back up


def test_new_entries_land_in_the_highest_tier_with_room(make_store):
    store = make_store(device_bytes=64 * KiB, host_bytes=0, disk_bytes="1MiB")
    small = store.put(torch.zeros(16 * KiB // 4))
    too_big = store.put(torch.zeros(128 * KiB // 4))
    assert store.where(small) is Tier.DEVICE
    assert store.where(too_big) is Tier.DISK  # the host tier has no budget, so it is skipped


@pytest.mark.parametrize("policy", ["lru", "lfu", "s3fifo"])
def test_budgets_hold_once_moves_settle(make_store, policy):
    store = make_store(device_bytes=100 * KiB, host_bytes=200 * KiB, disk_bytes="10MiB", policy=policy)
    values = [torch.randn(32 * KiB // 4) for _ in range(30)]
    handles = [store.put(v) for v in values]
    store.settle()
    tiers = store.stats()["tiers"]
    for name in ("device", "host", "disk"):
        assert tiers[name]["bytes"] <= tiers[name]["budget"], (name, tiers)
    assert sum(t["entries"] for t in tiers.values()) == len(values)
    for v, h in zip(values, handles, strict=True):
        assert torch.equal(store.get(h), v)
    store.settle()
    tiers = store.stats()["tiers"]
    for name in ("device", "host", "disk"):
        assert tiers[name]["bytes"] <= tiers[name]["budget"], (name, tiers)


def test_lru_demotes_the_oldest_entries_first(make_store):
    store = make_store(device_bytes=3 * 4 * KiB, host_bytes="1MiB", disk_bytes=0, policy="lru")
    handles = [store.put(torch.randn(KiB)) for _ in range(5)]  # 4 KiB each
    store.settle()
    assert [store.where(h) for h in handles] == [Tier.HOST, Tier.HOST, Tier.DEVICE, Tier.DEVICE, Tier.DEVICE]


def test_required_entries_are_never_dropped_under_pressure(make_store):
    store = make_store(device_bytes=8 * KiB, host_bytes=8 * KiB, disk_bytes=16 * KiB)
    values = [torch.randn(KiB) for _ in range(12)]  # 48 KiB > all budgets together
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handles = [store.put(v) for v in values]
        store.settle()
    assert any("over its budget" in str(w.message) and "raise host_bytes" in str(w.message) for w in caught)
    assert store.stats()["overcommits"] > 0
    for v, h in zip(values, handles, strict=True):
        assert torch.equal(store.get(h), v)


def test_cache_entries_are_dropped_at_the_bottom_and_report_eviction(make_store):
    store = make_store(device_bytes=8 * KiB, host_bytes=0, disk_bytes=8 * KiB)
    handles = [store.put(torch.randn(KiB), kind=Kind.CACHE, key=f"k{i}") for i in range(8)]
    store.settle()
    assert store.stats()["drops"] == 4
    dropped = [i for i, h in enumerate(handles) if h not in store]
    assert len(dropped) == 4
    assert store.lookup(f"k{dropped[0]}") is None
    with pytest.raises(EntryEvictedError, match="dropped"):
        store.get(handles[dropped[0]])
    assert store.lookup("k7") is not None  # the newest stays on the device


def test_a_key_put_twice_replaces_the_old_entry(make_store):
    store = make_store(device_bytes="1MiB", host_bytes="1MiB", disk_bytes="1MiB")
    first = store.put(torch.zeros(4), key="a", kind="cache")
    second = store.put(torch.ones(4), key="a", kind="cache")
    assert store.lookup("a") == second
    assert first not in store
    assert torch.equal(store.get(second), torch.ones(4))


def test_freed_and_foreign_handles_raise(make_store):
    a = make_store(device_bytes="1MiB", host_bytes="1MiB", disk_bytes="1MiB")
    b = make_store(device_bytes="1MiB", host_bytes="1MiB", disk_bytes="1MiB")
    h = a.put(torch.ones(3))
    a.free(h)
    a.free(h)  # twice is fine
    with pytest.raises(EntryNotFoundError, match="freed"):
        a.get(h)
    h2 = a.put(torch.ones(3))
    with pytest.raises(EntryNotFoundError, match="another store"):
        b.get(h2)


def test_closed_store_refuses_work_and_close_is_idempotent(make_store):
    store = make_store(device_bytes="1MiB", host_bytes="1MiB", disk_bytes="1MiB")
    store.close()
    store.close()
    with pytest.raises(StoreClosedError, match="closed"):
        store.put(torch.ones(2))


def test_prefetch_brings_entries_up_before_get(make_store):
    store = _spilling(make_store, device_bytes="1MiB")
    t = torch.randn(4096)
    h = store.put(t, tier=Tier.DISK)
    store.settle()
    store.prefetch([h])
    store.settle()
    assert store.where(h) is Tier.DEVICE
    before = store.stats()["waits"]
    assert torch.equal(store.get(h), t)
    assert store.stats()["waits"] == before  # no wait: it was already there


def test_demote_empties_the_device_tier(make_store):
    store = make_store(device_bytes="1MiB", host_bytes="1MiB", disk_bytes="1MiB")
    values = [torch.randn(1024) for _ in range(4)]
    handles = [store.put(v) for v in values]
    moved = store.demote(Tier.DEVICE)
    assert moved == 4 * 4096
    assert store.stats()["tiers"]["device"]["bytes"] == 0
    assert all(store.where(h) is Tier.HOST for h in handles)


def test_resize_shrinks_a_tier_at_once(make_store):
    store = make_store(device_bytes="1MiB", host_bytes="1MiB", disk_bytes="1MiB")
    for _ in range(4):
        store.put(torch.randn(1024))
    store.resize(Tier.DEVICE, "8KiB")
    store.settle()
    assert store.stats()["tiers"]["device"]["bytes"] <= 8 * KiB


# ---------------------------------------------------------------- disk failures


def _spilled(store: TierStore) -> tuple:
    t = torch.randn(2048)
    h = store.put(t, tier=Tier.DISK)
    store.settle()
    path = store.spill_path / f"{h.id}.ltc"
    assert path.exists()
    return t, h, path


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("damage", ["flip-payload", "flip-header", "truncate", "append"])
def test_damaged_spill_files_raise_and_never_return_a_tensor(make_store, codec, damage):
    store = _spilling(make_store, codec, device_bytes="1MiB")
    _, h, path = _spilled(store)
    data = bytearray(path.read_bytes())
    if damage == "flip-payload":
        data[-5] ^= 0x01
    elif damage == "flip-header":
        data[20] ^= 0x40
    elif damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data += b"\0"
    path.write_bytes(bytes(data))
    with pytest.raises(SpillCorruptError, match=str(path.name)):
        store.get(h)
    assert h not in store
    assert store.stats()["corrupt"] == 1


def test_missing_spill_file_raises_a_typed_error(make_store):
    store = _spilling(make_store, device_bytes="1MiB")
    _, h, path = _spilled(store)
    path.unlink()
    with pytest.raises(SpillMissingError, match="missing"):
        store.get(h)
    assert store.stats()["missing"] == 1


def test_disk_full_keeps_the_entry_a_tier_up_and_warns_once(make_store, monkeypatch):
    def full(*args, **kwargs):
        raise disk_mod.DiskFullError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(disk_mod, "write_parts", full)
    store = make_store(device_bytes=0, host_bytes="1MiB", disk_bytes="1GiB")
    values = [torch.randn(1024) for _ in range(3)]
    with pytest.warns(RuntimeWarning, match="could not spill") as record:
        handles = [store.put(v, tier=Tier.DISK) for v in values]
        store.settle()
    assert sum("could not spill" in str(w.message) for w in record) == 1
    assert store.stats()["disk_full"] >= 1
    for v, h in zip(values, handles, strict=True):
        assert store.where(h) is not Tier.DISK
        assert torch.equal(store.get(h), v)


def test_a_real_enospc_from_the_os_becomes_disk_full(tmp_path, monkeypatch):
    real_write = os.write

    def write(fd, buf):
        if len(buf) > 100:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, buf)

    monkeypatch.setattr(disk_mod.os, "write", write)
    with pytest.raises(disk_mod.DiskFullError):
        disk_mod.write_record(tmp_path / "x.ltc", torch.randn(1000), "none")
    assert list(tmp_path.iterdir()) == []  # no temp file left behind


def test_spill_folder_and_files_are_private(make_store):
    store = _spilling(make_store)
    _, _, path = _spilled(store)
    assert stat.S_IMODE(os.stat(store.spill_path).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_close_removes_the_spill_folder(make_store):
    store = _spilling(make_store)
    _spilled(store)
    folder = store.spill_path
    store.close()
    assert not folder.exists()


def test_a_crashed_process_folder_is_removed_on_the_next_start(spill_parent):
    dead = spill_parent / f"lightning_tiercache-{os.getuid()}-999999-123-abcdef01"
    dead.mkdir(mode=0o700)
    (dead / "1.ltc").write_bytes(b"x")
    alive_pid = os.getpid()
    alive = spill_parent / f"lightning_tiercache-{os.getuid()}-{alive_pid}-{disk_mod._start_ticks(alive_pid)}-0000aaaa"
    alive.mkdir(mode=0o700)
    other = spill_parent / "unrelated"
    other.mkdir()
    with TierStore(TierConfig(device_bytes=0, host_bytes=0, disk_bytes="1MiB", spill_dir=str(spill_parent))) as s:
        s.put(torch.ones(8))
        s.settle()
    assert not dead.exists()
    assert alive.exists() and other.exists()


def test_interpreter_exit_removes_the_spill_folder(tmp_path):
    import subprocess
    import sys

    code = (
        "import torch, sys\n"
        "from lightning_tiercache import TierStore, TierConfig\n"
        f"s = TierStore(TierConfig(device_bytes=0, host_bytes=0, disk_bytes='1MiB', spill_dir={str(tmp_path)!r}))\n"
        "s.put(torch.ones(64)); s.settle(); print(s.spill_path)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    folder = out.stdout.strip().splitlines()[-1]
    assert folder.startswith(str(tmp_path))
    assert not os.path.exists(folder)


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"device_bytes": -1}, "device_bytes=-1"),
        ({"host_bytes": "12 parsecs"}, "host_bytes='12 parsecs'"),
        ({"codec": "lz4"}, "codec='lz4' is not one of auto, none, zstd, byteplane"),
        ({"policy": "random"}, "policy='random' is not one of lru, lfu, s3fifo"),
        ({"io_threads": 0}, "io_threads=0"),
        ({"device": "gpu:7"}, "device='gpu:7'"),
    ],
)
def test_invalid_config_fields_name_the_field_value_and_choices(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TierConfig(**kwargs)


def test_unwritable_spill_dir_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.access(locked, os.W_OK):
        pytest.skip("running as a user that can write anywhere (root)")
    with pytest.raises(ValueError, match=r"spill_dir=.*not writable"):
        TierConfig(spill_dir=str(locked / "x"))


def test_spill_dir_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        TierConfig(spill_dir=str(f))


def test_sizes_accept_strings_and_none_sizes_from_the_machine():
    cfg = TierConfig(device_bytes="1.5KiB", host_bytes="2MB", disk_bytes=10)
    assert (cfg.device_bytes, cfg.host_bytes, cfg.disk_bytes) == (1536, 2_000_000, 10)
    with TierStore(TierConfig(device="cpu")) as s:
        budgets = s.budgets
    assert all(b > 0 for b in budgets.values())


# ---------------------------------------------------------------- threads


def test_concurrent_put_get_free_from_many_threads(make_store):
    store = make_store(device_bytes=64 * KiB, host_bytes=64 * KiB, disk_bytes="64MiB", io_threads=2)
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        live: list[tuple] = []
        try:
            for step in range(150):
                r = torch.rand((), generator=gen).item()
                if r < 0.45 or not live:
                    t = torch.randn(int(torch.randint(1, 4096, (), generator=gen)), generator=gen)
                    live.append((t, store.put(t)))
                elif r < 0.75:
                    t, h = live[int(torch.randint(len(live), (), generator=gen))]
                    if not torch.equal(store.get(h), t):
                        raise AssertionError(f"thread {seed} step {step}: wrong tensor")
                elif r < 0.85:
                    store.prefetch([h for _, h in live[-3:]])
                else:
                    _, h = live.pop(int(torch.randint(len(live), (), generator=gen)))
                    store.free(h)
            for t, h in live:
                if not torch.equal(store.get(h), t):
                    raise AssertionError(f"thread {seed}: wrong tensor at the end")
                store.free(h)
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "deadlock: a worker did not finish"
    assert not errors, errors
    store.settle()
    assert len(store) == 0
    assert all(v["bytes"] == 0 for v in store.stats()["tiers"].values())


def test_unwritable_spill_dir_is_refused_by_access_check(tmp_path, monkeypatch):
    monkeypatch.setattr("lightning_tiercache.config.os.access", lambda path, mode: False)
    with pytest.raises(ValueError, match=r"spill_dir=.*not writable by this user"):
        TierConfig(spill_dir=str(tmp_path / "x"))


def test_window_peaks_reset_apart_from_the_peaks_since_open(make_store):
    store = make_store(device_bytes="1MiB", host_bytes="1MiB", disk_bytes="1MiB")
    h = store.put(torch.zeros(1024))
    store.free(h)
    assert store.stats(reset_window=True)["tiers"]["device"]["window_peak_bytes"] == 4096
    device = store.stats()["tiers"]["device"]
    assert device["window_peak_bytes"] == 0  # the new window saw nothing
    assert device["peak_bytes"] == 4096  # the peak since open is never reset
    store.put(torch.zeros(256))
    assert store.stats()["tiers"]["device"]["window_peak_bytes"] == 1024


def test_an_empty_store_is_truthy(make_store):
    store = make_store(device_bytes="1MiB", host_bytes="1MiB", disk_bytes="1MiB")
    assert len(store) == 0 and bool(store)


def test_a_copy_that_cannot_allocate_leaves_accounting_as_it_was(sim_store):
    store = sim_store(device_bytes="1MiB", host_bytes="1MiB", disk_bytes=0, sim={"capacity_bytes": 0})
    t = torch.randn(1024)
    h = store.put(t, tier=Tier.HOST)
    store.settle()
    store.prefetch([h])  # speculative: skipped, as it would not fit
    with pytest.raises(torch.OutOfMemoryError, match="simulated"):
        store.get(h)  # a get that cannot allocate reports it
    tiers = store.stats()["tiers"]
    assert (tiers["device"]["bytes"], tiers["host"]["bytes"]) == (0, 4096)
    assert store.stats()["prefetch_skipped"] == 1
    # Only the get tried: a speculative prefetch that does not fit must not make the allocator flush its caches.
    assert store.device_ops.flushes == 1
    store.device_ops.capacity_bytes = None
    assert torch.equal(store.get(h), t)


def test_an_entry_freed_before_its_write_starts_is_never_written(make_store, monkeypatch):
    from lightning_tiercache.store.codec import AutoCodec

    started, release = threading.Event(), threading.Event()
    encode = AutoCodec.encode

    def held(self, tensor):
        started.set()
        release.wait(10)
        return encode(self, tensor)

    monkeypatch.setattr(AutoCodec, "encode", held)
    store = make_store(device_bytes="1MiB", host_bytes=0, disk_bytes="1GiB", codec="auto", io_threads=1)
    first = store.put(torch.randn(1024), tier=Tier.DISK)
    assert started.wait(10)  # the one I/O thread is busy with the first write
    queued = store.put(torch.randn(1024), tier=Tier.DISK)
    store.free(queued)
    release.set()
    store.settle()
    st = store.stats()
    assert (st["spills"], st["writes_skipped"]) == (1, 1)
    assert len(list(store.spill_path.iterdir())) == 1 and store.where(first) is Tier.DISK
    assert st["tiers"]["disk"]["bytes"] == 4096 and st["tiers"]["device"]["bytes"] == 0


def _compressible(n: int = 1 << 20) -> torch.Tensor:
    return (torch.randn(n) * 0.01).to(torch.bfloat16)  # sign/exponent bytes repeat: both codecs compress it


def test_auto_writes_raw_bytes_while_the_disk_is_faster_than_any_codec_and_compresses_when_it_pays():
    from lightning_tiercache.store.codec import AutoCodec

    fast, slow = AutoCodec(), AutoCodec()
    for _ in range(20):
        fast.observe_disk(1 << 30, 0.01)  # 100 GB/s: no codec can pay for itself
        slow.observe_disk(1 << 20, 1.0)  # 1 MB/s
    picked = [fast.encode(_compressible())[0] for _ in range(10)]
    assert picked == ["none"] * 10  # trials time a sample; the tensors themselves are never written slower
    assert [slow.encode(_compressible())[0] for _ in range(4)][-1] in ("byteplane", "zstd")
