"""CUDA gather of KV blocks out of pinned host memory (``csrc/paged_gather.cu``), via ctypes.

The same copy as :mod:`~servelab.kernels.gather_triton` (keys then values of a chunk's
blocks, one launch, bytes exact), with what costs host time taken out of the launch:

- a ctypes call into a launcher built once with nvcc (:mod:`~servelab.kernels.cuda_ext`),
  microseconds where a Triton launch from Python costs ~0.1 ms;
- the block ids are read by the kernel straight from a pinned host ``int64`` buffer
  (mapped under UVA like the cache), so no synchronous id copy precedes the launch. Such a
  buffer must not be rewritten while a launch that reads it may still be pending:
  :class:`IdRing` hands them out and waits on the event of the last launch that used one;
- the launcher takes the raw stream handle, so the copy stream needs no ``torch.cuda.stream``
  context switch.

Loads are 16 bytes wide where the pointers, strides and block size allow it (else 8, 4, 2
or 1), eight per thread in flight; the persistent grid is capped (``programs``) so that most
SMs stay free for the attention running beside the copy.

The same library holds the copy-engine way of the same copy (:func:`copy_blocks_batched`,
the ``copy_batch`` staging strategy): a few ``cudaMemcpyBatchAsync`` calls per chunk, which run
nearer the link's contiguous copy rate than any SM path measured (run 13 in
docs/history/paged-attention.md).
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from servelab.errors import KernelInputError
from servelab.kernels import cuda_ext
from servelab.kernels.paged_cache import block_bytes

# CTAs in the persistent grid: as the Triton gather (docs/kernels-paged.md, "Staging strategies").
PROGRAMS = 32
# Threads per CTA (a multiple of 32, at most 512). With 8 loads of 16 bytes per thread in
# flight, 32 CTAs of 256 threads keep 1 MiB of reads outstanding on the link.
THREADS = 256
# copy_batch: copies in the first cudaMemcpyBatchAsync of a chunk, and the most in one batch
# (each batch after the first doubles, up to this).
BATCH_FIRST = 8
BATCH_SIZE = 512

_NAME = "paged_gather"


@dataclass(frozen=True)
class _Launcher:
    lib: ctypes.CDLL
    gather: Any  # the ctypes functions, argtypes set
    vector_bytes: Any
    copy_batch: Any


@functools.cache
def _load(arch: str) -> _Launcher:
    # Memoized per process: the library is a process-wide resource (ctypes keeps it loaded),
    # and cuda_ext.build hashes the source on every call.
    lib = cuda_ext.build(_NAME, cuda_ext.source("paged_gather.cu"), arch).lib
    vp, ll, i32 = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int
    gather = lib.paged_gather_kv
    gather.restype = i32
    gather.argtypes = [vp, vp, vp, vp, vp, ll, ll, ll, ll, ll, i32, i32, vp]
    width = lib.paged_gather_vector_bytes
    width.restype = i32
    width.argtypes = [vp, vp, vp, vp, ll, ll, ll, ll]
    batch = lib.paged_copy_batch
    batch.restype = i32
    batch.argtypes = [vp, vp, vp, vp, vp, ll, ll, ll, ll, ll, ll, ll, vp]
    return _Launcher(lib, gather, width, batch)


@functools.cache
def _arch(index: int) -> str:
    return cuda_ext.arch_flag(torch.device("cuda", index))


def launcher(device: torch.device) -> _Launcher:
    """The loaded library for ``device`` (built with nvcc on first use, then cached)."""
    return _load(_arch(_device_index(device)))


def available(src: torch.Tensor, device: torch.device) -> bool:
    """Whether the CUDA gather can stage the host cache ``src`` to ``device``: a CUDA device
    with nvcc (and ``SERVELAB_NO_CUDA_EXT`` unset), and a pinned source. Builds nothing."""
    return cuda_ext.enabled(device) and src.device.type == "cpu" and bool(src.is_pinned())


def copy_batch_available(src: torch.Tensor, device: torch.device) -> bool:
    """Whether :func:`copy_blocks_batched` can stage the host cache ``src`` to ``device``: as
    :func:`available`, and the runtime the library was built against and the driver both
    take ``cudaMemcpyBatchAsync`` (CUDA 12.8+; probed once per device by a 16-byte batch).
    Builds the library on first use."""
    return available(src, device) and _batch_works(_device_index(device))


def _device_index(device: torch.device) -> int:
    return int(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _batch_works(index: int) -> bool:
    dev = torch.device("cuda", index)
    lau = launcher(dev)
    src = torch.arange(16, dtype=torch.uint8).pin_memory()
    dst = torch.zeros(16, dtype=torch.uint8, device=dev)
    ids = torch.zeros(1, dtype=torch.int64)
    stream = torch.cuda.Stream(dev)  # type: ignore[no-untyped-call]
    ptr = src.data_ptr()
    rc = lau.copy_batch(ptr, ptr, dst.data_ptr(), dst.data_ptr(), ids.data_ptr(), 1, 16, 16, 16,
                        16, 1, 1, stream.cuda_stream)  # fmt: skip
    stream.synchronize()
    return rc == 0 and torch.equal(dst.cpu(), src)


def copy_blocks_batched(
    src_key: torch.Tensor,
    src_value: torch.Tensor,
    ids: torch.Tensor,
    dst_key: torch.Tensor,
    dst_value: torch.Tensor,
    *,
    stream: Any = None,
    first: int = BATCH_FIRST,
    per_batch: int = BATCH_SIZE,
) -> None:
    """Enqueue ``dst[i] = src[ids[i]]`` for K and V on the copy engines: one copy per run of
    consecutive ids (merged when the host cache is dense), in a few ``cudaMemcpyBatchAsync``
    calls on ``stream`` (a ``torch.cuda.Stream``, default: the current stream of ``dst_key``'s
    device; on the legacy default stream, which the API refuses, one ``cudaMemcpyAsync`` a
    run instead).

    ``ids``: a contiguous host ``int64`` tensor, read during the call (it may be rewritten as
    soon as this returns). The copies go in batches: ``first`` copies, then each batch twice
    the one before, up to ``per_batch`` (the driver spends ~0.5 µs of host time a copy; a
    small first batch starts the link early, large batches cost less a copy). The other
    arguments as :func:`gather_kv_blocks_from_host`; trusted (the caller validates them)."""
    call = _call(src_key, src_value, ids, dst_key, dst_value, stream)
    if call is not None:
        lau, ptrs, (n, *geometry), handle = call
        rc = lau.copy_batch(*ptrs, ids.data_ptr(), n, *geometry, first, per_batch, handle)
        if rc:
            cuda_ext.check(lau.lib, rc, "paged_copy_batch")


def gather_kv_blocks_from_host(
    src_key: torch.Tensor,
    src_value: torch.Tensor,
    host_ids: torch.Tensor,
    dst_key: torch.Tensor,
    dst_value: torch.Tensor,
    *,
    programs: int | None = None,
    threads: int = THREADS,
    stream: Any = None,
) -> None:
    """Enqueue ``dst[i] = src[host_ids[i]]`` for K and V, byte for byte, in one launch.

    ``src_*`` pinned host caches ``[N, block_size, Hkv, D]`` with dense blocks (any block
    stride); ``dst_*`` contiguous device buffers of at least ``len(host_ids)`` blocks;
    ``host_ids`` a contiguous **pinned host int64** tensor that must stay unchanged until the
    launch has run (see :class:`IdRing`). ``stream``: a ``torch.cuda.Stream`` (default: the
    current stream of ``dst_key``'s device). Trusted arguments (the caller validates them).
    """
    call = _call(src_key, src_value, host_ids, dst_key, dst_value, stream)
    if call is not None:
        lau, ptrs, (n, *geometry), handle = call
        grid = PROGRAMS if programs is None else min(programs, 1 << 30)
        rc = lau.gather(*ptrs, host_ids.data_ptr(), n, *geometry, grid, threads, handle)
        if rc:
            cuda_ext.check(lau.lib, rc, "paged_gather_kv")


def _call(
    src_key: torch.Tensor,
    src_value: torch.Tensor,
    ids: torch.Tensor,
    dst_key: torch.Tensor,
    dst_value: torch.Tensor,
    stream: Any,
) -> tuple[_Launcher, tuple[int, ...], tuple[int, ...], int] | None:
    """What both launchers take, in their order: the library, the four base pointers, (the
    id count, block bytes, the three block strides) and the stream's handle (default: the
    current stream of ``dst_key``'s device); None when there are no ids."""
    n = int(ids.numel())
    if n == 0:
        return None
    if stream is None:
        stream = torch.cuda.current_stream(dst_key.device)
    ptrs, geometry = _layout(src_key, src_value, dst_key, dst_value)
    return launcher(dst_key.device), ptrs, (n, *geometry), int(stream.cuda_stream)


def vector_bytes(
    src_key: torch.Tensor, src_value: torch.Tensor, dst_key: torch.Tensor, dst_value: torch.Tensor
) -> int:
    """The load width (16, 8, 4, 2 or 1 bytes) the kernel picks for these tensors."""
    ptrs, geometry = _layout(src_key, src_value, dst_key, dst_value)
    return int(launcher(dst_key.device).vector_bytes(*ptrs, *geometry))


def _layout(
    src_key: torch.Tensor, src_value: torch.Tensor, dst_key: torch.Tensor, dst_value: torch.Tensor
) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    """The four base pointers, then (block bytes, source key / source value / destination
    block strides in bytes), in the order both launchers take them."""
    elem = src_key.element_size()
    ptrs = (src_key.data_ptr(), src_value.data_ptr(), dst_key.data_ptr(), dst_value.data_ptr())
    strides = (src_key.stride(0) * elem, src_value.stride(0) * elem, dst_key.stride(0) * elem)
    return ptrs, (block_bytes(src_key), *strides)


class Guard(Protocol):
    """What :class:`IdRing` needs of an event: block until the work before it has run."""

    def synchronize(self) -> None: ...


def pinned_int64(n: int) -> torch.Tensor:
    return torch.empty(n, dtype=torch.int64, pin_memory=True)


class IdRing:
    """A few pinned host buffers of block ids, handed out in turn, each reused only after the
    launches that read it have run.

    A launch reads its ids when it executes, which may be long after the host returned from
    the call that enqueued it; rewriting the buffer before then would stage the wrong blocks.
    So :meth:`acquire` waits on the guard (the event recorded after the last launch that read
    the buffer, set with :meth:`guard`) before handing the buffer out again. With ``slots``
    buffers the host may run that many calls ahead of the copies before it blocks.

    >>> ring = IdRing(slots=2, allocate=lambda n: torch.empty(n, dtype=torch.int64))
    >>> slot, buf = ring.acquire(3)
    >>> (slot, buf.numel() >= 3)
    (0, True)
    >>> ring.acquire(5)[0], ring.acquire(1)[0]
    (1, 0)
    """

    def __init__(
        self, slots: int = 8, allocate: Callable[[int], torch.Tensor] = pinned_int64
    ) -> None:
        if slots < 1:
            raise KernelInputError(f"IdRing needs at least one slot; got slots={slots}")
        self._allocate = allocate
        self._buffers: list[torch.Tensor | None] = [None] * slots
        self._guards: list[Guard | None] = [None] * slots
        self._next = 0

    @property
    def slots(self) -> int:
        return len(self._buffers)

    def acquire(self, n: int) -> tuple[int, torch.Tensor]:
        """The next slot and its buffer (at least ``n`` ids), safe to overwrite now."""
        slot = self._next
        self._next = (slot + 1) % len(self._buffers)
        self.wait(slot)
        buf = self._buffers[slot]
        if buf is None or buf.numel() < n:
            # Grow geometrically: a pinned allocation costs far more than the ids it holds.
            size = max(n, 256, 0 if buf is None else 2 * buf.numel())
            self._buffers[slot] = buf = self._allocate(size)
        return slot, buf

    def guard(self, slot: int, event: Guard | None) -> None:
        """``event`` follows every launch so far that read slot ``slot``'s buffer."""
        self._guards[slot] = event

    def wait(self, slot: int) -> None:
        guard = self._guards[slot]
        if guard is not None:
            guard.synchronize()
            self._guards[slot] = None
