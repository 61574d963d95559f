"""Physical limits of this machine: memcpy, host<->device copies, raw file I/O and plain zstd level 1.

``python -m lightning_tiercache.bench limits [--size 64MiB] [--repeats N] [--json] [--full]``

Every figure is bytes of the *uncompressed* buffer per second, the median over interleaved rounds after a
warm-up. The measurement pieces are public so :mod:`lightning_tiercache.bench.store` can time the limit and
the store side by side on the same bytes:

* :func:`activation_like` makes the test data (see its docstring: LayerNorm and GELU outputs, not noise).
* :func:`raw_write` / :func:`raw_read` are the plain ``os.write`` / ``readinto`` loops the disk tier is
  compared with. Reads of a file just written come from the **page cache**; where the OS offers
  ``posix_fadvise`` a cold read (file flushed with ``fsync``, then its pages dropped with
  ``POSIX_FADV_DONTNEED``, which needs no root) is measured too, for reference.
* :func:`interleave` times variants A B C A B C ... with untimed set-up and tear-down steps.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import zstandard

from lightning_tiercache.bench.common import base_parser, emit, median
from lightning_tiercache.config import TierConfig, parse_bytes

__all__ = [
    "ACTIVATION_KINDS",
    "Step",
    "activation_like",
    "as_buffer",
    "interleave",
    "main",
    "measure_limits",
    "raw_read",
    "raw_write",
    "scratch_dir",
]

#: The activation generators :func:`activation_like` knows.
ACTIVATION_KINDS = ("gelu", "layernorm")
_WIDTH = 1024


def activation_like(numel: int, dtype: torch.dtype, kind: str = "gelu", seed: int = 0) -> torch.Tensor:
    """A 1-D tensor of ``numel`` values shaped like saved transformer activations.

    Rows of width 1024 are drawn as ``x = randn * s`` with a per-feature scale ``s = exp(0.5 * randn)``
    (residual streams have features of very different size), then ``h = layer_norm(x)`` with weight
    ``1 + 0.1 * randn`` and bias ``0.1 * randn``. ``kind="layernorm"`` returns ``h`` (the input of an MLP
    or attention projection); ``kind="gelu"`` returns ``gelu(h)`` (the input of the second MLP matmul,
    about half of it small negative values). Computed in float32, then cast to ``dtype``.

    Raises:
        ValueError: ``kind`` is not one of :data:`ACTIVATION_KINDS`.
    """
    if kind not in ACTIVATION_KINDS:
        raise ValueError(f"kind={kind!r} is not one of {', '.join(ACTIVATION_KINDS)}")
    g = torch.Generator().manual_seed(seed)
    rows = max(1, math.ceil(numel / _WIDTH))
    scale = torch.exp(0.5 * torch.randn(_WIDTH, generator=g))
    weight = 1 + 0.1 * torch.randn(_WIDTH, generator=g)
    bias = 0.1 * torch.randn(_WIDTH, generator=g)
    x = torch.randn(rows, _WIDTH, generator=g) * scale
    h = F.layer_norm(x, (_WIDTH,), weight, bias)
    out = F.gelu(h) if kind == "gelu" else h
    return out.reshape(-1)[:numel].to(dtype).contiguous()


def as_buffer(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    array: Any = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    return memoryview(array).cast("B")


def raw_write(path: Path, buf: memoryview, durable: bool = False) -> int:
    """Write ``buf`` to a new file at ``path`` with plain ``os.write`` calls; ``fsync`` when ``durable``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), 0o600)
    try:
        view, written = buf, 0
        while view.nbytes:
            n = os.write(fd, view)
            written += n
            view = view[n:]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    return written


def raw_read(path: Path, out: memoryview) -> int:
    """Read the file at ``path`` into ``out`` (``readinto``, unbuffered). Returns the bytes read."""
    got = 0
    with open(path, "rb", buffering=0) as f:
        while got < out.nbytes:
            n = f.readinto(out[got:])
            if not n:
                break
            got += n
    return got


def drop_cached(path: Path) -> bool:
    """Ask the OS to drop ``path``'s clean cached pages (no root needed). False where unsupported."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def scratch_dir(parent: str | os.PathLike[str] | None = None) -> Path:
    """A fresh private folder under the store's spill parent (the system temp dir by default)."""
    base = TierConfig(spill_dir=parent).spill_parent if parent is not None else Path(tempfile.gettempdir())
    return Path(tempfile.mkdtemp(prefix="tiercache-bench-", dir=base))


@dataclass
class Step:
    """One variant of an interleaved measurement: ``run`` is timed, ``before``/``after`` are not."""

    run: Callable[[], Any]
    before: Callable[[], Any] | None = None
    after: Callable[[], Any] | None = None


def interleave(variants: dict[str, Step], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Time each variant ``repeats`` times, interleaved (A B C A B C ...) after ``warmup`` untimed rounds."""
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(warmup + repeats):
        for name, step in variants.items():
            if step.before is not None:
                step.before()
            start = time.perf_counter()
            step.run()
            seconds = time.perf_counter() - start
            if step.after is not None:
                step.after()
            if r >= warmup:
                times[name].append(seconds)
    return times


def _cuda_variants(nbytes: int) -> dict[str, Step]:
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    pageable = torch.empty(nbytes, dtype=torch.uint8)

    def copy(dst: torch.Tensor, src: torch.Tensor) -> Callable[[], None]:
        def run() -> None:
            dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize()

        return run

    return {
        "h2d_pinned": Step(copy(dev, pinned)),
        "d2h_pinned": Step(copy(pinned, dev)),
        "h2d_pageable": Step(copy(dev, pageable)),
        "d2h_pageable": Step(copy(pageable, dev)),
    }


def measure_limits(
    nbytes: int = 64 << 20,
    repeats: int = 5,
    spill_dir: str | os.PathLike[str] | None = None,
    cold: bool = True,
) -> dict[str, Any]:
    """Measure this machine's limits on ``nbytes`` of bf16 GELU-like data.

    Returns a dict of bytes per second (``*_Bps``) plus ``zstd1_ratio`` (raw / compressed bytes),
    ``nbytes``, ``repeats`` and ``dir`` (where the files went). Keys: ``memcpy_Bps``, ``file_write_Bps``
    (page cache, no fsync: what the disk tier does), ``file_read_Bps`` (from page cache),
    ``zstd1_compress_Bps``, ``zstd1_decompress_Bps``; with ``cold`` and ``posix_fadvise``:
    ``file_write_fsync_Bps`` and ``file_read_cold_Bps``; with CUDA: ``h2d_pinned_Bps``, ``d2h_pinned_Bps``,
    ``h2d_pageable_Bps``, ``d2h_pageable_Bps``.
    """
    data = activation_like(max(1, nbytes // 2), torch.bfloat16, "gelu")
    buf = as_buffer(data)
    nbytes = buf.nbytes
    dst = torch.empty(nbytes, dtype=torch.uint8)
    src = data.view(torch.uint8)
    out = memoryview(bytearray(nbytes))
    folder = scratch_dir(spill_dir)
    path = folder / "limit.bin"
    cctx = zstandard.ZstdCompressor(level=1)
    dctx = zstandard.ZstdDecompressor()
    frame = cctx.compress(buf)
    try:
        raw_write(path, buf)
        variants = {
            "memcpy": Step(lambda: dst.copy_(src)),
            "file_write": Step(lambda: raw_write(path, buf), before=lambda: path.unlink(missing_ok=True)),
            "file_read": Step(lambda: raw_read(path, out)),
            "zstd1_compress": Step(lambda: cctx.compress(buf)),
            "zstd1_decompress": Step(lambda: dctx.decompress(frame, max_output_size=nbytes)),
        }
        if cold and hasattr(os, "posix_fadvise"):
            cold_path = folder / "cold.bin"
            variants["file_write_fsync"] = Step(
                lambda: raw_write(cold_path, buf, durable=True), before=lambda: cold_path.unlink(missing_ok=True)
            )
            variants["file_read_cold"] = Step(lambda: raw_read(cold_path, out), before=lambda: drop_cached(cold_path))
        if torch.cuda.is_available():
            variants.update(_cuda_variants(nbytes))
        times = interleave(variants, repeats)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    result: dict[str, Any] = {f"{k}_Bps": nbytes / median(v) for k, v in times.items()}
    result.update(zstd1_ratio=nbytes / len(frame), nbytes=nbytes, repeats=repeats, dir=str(folder.parent))
    return result


_NOTES = {
    "memcpy": "torch copy_ between two CPU tensors",
    "file_write": "os.write to a new file, no fsync (lands in page cache), as the disk tier writes",
    "file_read": "readinto a reused buffer; the file was just written, so from page cache",
    "file_write_fsync": "os.write then fsync (durable); reference only",
    "file_read_cold": "after fsync + posix_fadvise(DONTNEED): from the device, unless a VM host caches it",
    "zstd1_compress": "zstandard level 1, bytes in per second",
    "zstd1_decompress": "zstandard, bytes out per second",
    "h2d_pinned": "copy_ pinned host -> CUDA",
    "d2h_pinned": "copy_ CUDA -> pinned host",
    "h2d_pageable": "copy_ pageable host -> CUDA",
    "d2h_pageable": "copy_ CUDA -> pageable host",
}


def main(argv: list[str]) -> int:
    p = base_parser("limits", "Measure this machine's copy, file and zstd-1 bandwidth.")
    p.add_argument("--size", default=None, help="bytes per buffer, e.g. 64MiB (default 64MiB, --full 512MiB)")
    p.add_argument("--spill-dir", default=None, help="folder for the files (default: the system temp dir)")
    args = p.parse_args(argv)
    nbytes = parse_bytes(args.size, "--size") if args.size else (512 << 20 if args.full else 64 << 20)
    repeats = args.repeats or (9 if args.full else 5)
    lim = measure_limits(nbytes, repeats, args.spill_dir)
    rows: list[dict[str, Any]] = []
    for name, note in _NOTES.items():
        if f"{name}_Bps" in lim:
            row: dict[str, Any] = {"limit": name, "GB/s": lim[f"{name}_Bps"] / 1e9, "note": note}
            if name.startswith("zstd1"):
                row["note"] = f"{note}; ratio {lim['zstd1_ratio']:.3f} on bf16 GELU-like data"
            rows.append(row)
    extra = {"limits": lim} if args.json else {"size": f"{lim['nbytes'] / 2**20:.0f} MiB", "dir": lim["dir"]}
    emit("limits", rows, args.json, extra)
    return 0
