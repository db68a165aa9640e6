"""Staging scattered KV blocks from host memory into a device scratch.

Five staging strategies, chosen by measurement (docs/kernels-paged.md):

``per_block``
    One ``copy_`` per block. Each copy pays a fixed cost, so 16-token blocks (64 KiB of
    K+V at 8 KV heads, head 128, bf16) run at a few GB/s on a 50 GB/s link.
``coalesced``
    One ``copy_`` per run of consecutive physical block ids (needs a dense cache, block
    stride = block size). As fast as one big copy when the table is contiguous, as slow as
    ``per_block`` when it is scattered.
``cpu_pack``
    ``index_select`` on the host into a pinned pack buffer, then one copy. CPU-bound.
``copy_batch``
    The copy engines, every block copy of a chunk (one per run of consecutive ids) in a few
    ``cudaMemcpyBatchAsync`` calls issued from C (``gather_cuda.copy_blocks_batched``). Over a
    random table of 512 KiB blocks it runs at 98-99 % of one contiguous copy, where one
    ``cudaMemcpyAsync`` a block runs at ~77 % and the SM gather below at ~91 %, and it
    leaves every SM to the attention. The driver spends ~0.5 µs of host time a copy, so
    small blocks (32 KiB) make it host-bound: ``auto`` takes the gather for those. CUDA
    12.8+ with nvcc, pinned source.
``gpu_gather``
    A kernel on the device reads the blocks straight out of pinned host memory (mapped into
    the device's address space) and writes them densely into the scratch: one launch per
    chunk whatever the block size or order. CUDA only. Two kernels (:class:`GatherKernel`):
    the CUDA one (``gather_cuda.py``, built with nvcc, launched through ctypes, reading the
    block ids from pinned host memory) where ``cuda_ext.enabled`` says it can be built, else
    the Triton one (``gather_triton.py``, block ids on the device).

``auto`` picks ``copy_batch`` where it can run and blocks are at least 64 KiB, else
``gpu_gather`` where that can (CUDA, pinned source, nvcc or Triton), else ``cpu_pack`` on a
CPU device (which packs straight into the scratch) and ``coalesced`` elsewhere (XPU,
pageable sources).

Copies are enqueued on the caller's current stream (or, for ``copy_batch`` and the CUDA
gather, the stream passed in); the pipeline in ``paged.py`` decides which stream that is.
Block ids come in as a host ``int64`` tensor; the Triton gather also needs them on the
device, the CUDA gather needs them in pinned memory.
"""

from __future__ import annotations

import enum
import importlib.util
from dataclasses import dataclass, field
from typing import Any

import torch

from servelab.errors import KernelInputError
from servelab.kernels import cuda_ext, gather_cuda
from servelab.kernels.gather_cuda import IdRing
from servelab.kernels.paged_cache import block_bytes
from servelab.kernels.validation import (
    KV_DTYPES,
    CheckMemo,
    describe,
    require_dtype,
    require_int,
    require_ndim,
    same_device,
)


class GatherStrategy(enum.Enum):
    """How scattered host blocks reach the device scratch."""

    AUTO = "auto"
    PER_BLOCK = "per_block"
    COALESCED = "coalesced"
    CPU_PACK = "cpu_pack"
    COPY_BATCH = "copy_batch"
    GPU_GATHER = "gpu_gather"


def parse_strategy(value: str | GatherStrategy) -> GatherStrategy:
    if isinstance(value, GatherStrategy):
        return value
    try:
        return GatherStrategy(value)
    except ValueError:
        names = ", ".join(s.value for s in GatherStrategy)
        raise KernelInputError(f"strategy must be one of [{names}]; got {value!r}") from None


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def is_pinned(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and bool(t.is_pinned())


def gpu_gather_supported(src: torch.Tensor, device: torch.device) -> bool:
    return (
        device.type == "cuda"
        and is_pinned(src)
        and (cuda_ext.enabled(device) or triton_available())
    )


class GatherKernel(enum.Enum):
    """Which kernel serves the ``gpu_gather`` strategy."""

    AUTO = "auto"
    CUDA = "cuda"
    TRITON = "triton"


def resolve_gather_kernel(
    kernel: str | GatherKernel, src: torch.Tensor, device: torch.device
) -> GatherKernel:
    """The concrete gather kernel (CUDA or TRITON) for ``gpu_gather`` from ``src`` to
    ``device``: ``auto`` is the CUDA one where :func:`gather_cuda.available` says it can
    run, else Triton."""
    if isinstance(kernel, GatherKernel):
        chosen = kernel
    else:
        try:
            chosen = GatherKernel(kernel)
        except ValueError:
            names = ", ".join(k.value for k in GatherKernel)
            raise KernelInputError(
                f"gather_kernel must be one of [{names}]; got {kernel!r}"
            ) from None
    cuda_ok = gather_cuda.available(src, device)
    if chosen is GatherKernel.AUTO:
        return GatherKernel.CUDA if cuda_ok else GatherKernel.TRITON
    if chosen is GatherKernel.CUDA and not cuda_ok:
        raise KernelInputError(
            "gather_kernel='cuda' needs a CUDA device, nvcc (CUDA_HOME, /usr/local/cuda or "
            "PATH; SERVELAB_NO_CUDA_EXT unset) and a pinned host cache; got device "
            f"{device}, nvcc {'found' if cuda_ext.find_nvcc() else 'missing'}, cache "
            f"pinned={is_pinned(src)}. Use gather_kernel='auto' or 'triton'"
        )
    if chosen is GatherKernel.TRITON and not triton_available():
        raise KernelInputError("gather_kernel='triton' needs Triton; use 'auto' or 'cuda'")
    return chosen


# ``auto`` takes ``copy_batch`` for blocks of at least this many bytes (per K or V block) and
# the gather below it: the driver spends ~0.5 µs of host time a copy, so small blocks make
# the copy engines host-bound. Run 15 (H100, decode, 8 KV heads, head 128, bf16): 64 KiB
# blocks 85-93 % of the copy rate by copy_batch against 80-85 % by the CUDA gather, 32 KiB
# blocks 67-70 % against 76-79 %.
COPY_BATCH_MIN_BLOCK_BYTES = 64 * 1024


def resolve_strategy(
    strategy: str | GatherStrategy, src: torch.Tensor, device: torch.device
) -> GatherStrategy:
    """The concrete strategy for a host cache ``src`` staged to ``device``."""
    chosen = parse_strategy(strategy)
    if chosen is GatherStrategy.AUTO:
        if block_bytes(src) >= COPY_BATCH_MIN_BLOCK_BYTES and gather_cuda.copy_batch_available(
            src, device
        ):
            return GatherStrategy.COPY_BATCH
        if gpu_gather_supported(src, device):
            return GatherStrategy.GPU_GATHER
        if device.type == "cpu":
            return GatherStrategy.CPU_PACK
        return GatherStrategy.COALESCED
    if chosen is GatherStrategy.GPU_GATHER and not gpu_gather_supported(src, device):
        raise KernelInputError(
            "strategy 'gpu_gather' needs a CUDA device, nvcc or Triton, and a pinned host "
            f"cache; got device {device}, triton "
            f"{'present' if triton_available() else 'missing'}, cache pinned={is_pinned(src)}."
            " Use strategy='auto' or 'coalesced'"
        )
    if chosen is GatherStrategy.COPY_BATCH and not gather_cuda.copy_batch_available(src, device):
        raise KernelInputError(
            "strategy 'copy_batch' needs a CUDA device, nvcc (CUDA 12.8 or newer; "
            "SERVELAB_NO_CUDA_EXT unset), a driver with cudaMemcpyBatchAsync and a pinned host "
            f"cache; got device {device}, nvcc "
            f"{'found' if cuda_ext.find_nvcc() else 'missing'}, cache pinned={is_pinned(src)}."
            " Use strategy='auto' or 'gpu_gather'"
        )
    return chosen


def block_runs(block_ids: list[int]) -> list[tuple[int, int, int]]:
    """``(dst_start, src_start, length)`` for each run of consecutive block ids.

    >>> block_runs([4, 5, 6, 9, 2, 3])
    [(0, 4, 3), (3, 9, 1), (4, 2, 2)]
    """
    runs: list[tuple[int, int, int]] = []
    for i, b in enumerate(block_ids):
        if runs and runs[-1][1] + runs[-1][2] == b:
            d, s, n = runs[-1]
            runs[-1] = (d, s, n + 1)
        else:
            runs.append((i, b, 1))
    return runs


def is_dense_blocks(t: torch.Tensor) -> bool:
    """Block stride equals block size, so a run of blocks is one contiguous range."""
    return t.is_contiguous()


@dataclass(frozen=True)
class StagingScratch:
    """Reusable device scratch: ``buffers`` slots of ``chunk_blocks`` blocks for K and V.

    ``key``/``value`` are ``[buffers, chunk_blocks, block_size, Hkv, D]`` on the device;
    ``pack_key``/``pack_value`` the pinned host pack buffers of the ``cpu_pack`` strategy
    (``None`` unless asked for, and never needed on a CPU device).

    Host-side state that belongs to whoever calls with this scratch: ``id_ring``, the pinned
    block-id buffers of the CUDA gather (allocated on first use), and ``checks``, the
    argument checks already passed by the caches used with it (``paged.py``).
    """

    key: torch.Tensor
    value: torch.Tensor
    pack_key: torch.Tensor | None = None
    pack_value: torch.Tensor | None = None
    id_ring: IdRing = field(default_factory=IdRing, compare=False, repr=False)
    checks: CheckMemo = field(default_factory=CheckMemo, compare=False, repr=False)

    @classmethod
    def allocate(
        cls,
        *,
        chunk_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
        buffers: int = 2,
        with_pack: bool = False,
    ) -> StagingScratch:
        """Allocate a scratch; ``buffers=2`` double-buffers copy against compute."""
        for name, v in (
            ("chunk_blocks", chunk_blocks),
            ("block_size", block_size),
            ("num_kv_heads", num_kv_heads),
            ("head_size", head_size),
            ("buffers", buffers),
        ):
            require_int(name, v, minimum=1)
        if dtype not in KV_DTYPES:
            raise KernelInputError(f"scratch dtype must be one of {KV_DTYPES}; got {dtype}")
        dev = torch.device(device)
        shape = (buffers, chunk_blocks, block_size, num_kv_heads, head_size)
        key = torch.empty(shape, dtype=dtype, device=dev)
        value = torch.empty(shape, dtype=dtype, device=dev)
        pack_key = pack_value = None
        if with_pack and dev.type != "cpu":
            pack_key = torch.empty(shape, dtype=dtype, pin_memory=True)
            pack_value = torch.empty(shape, dtype=dtype, pin_memory=True)
        return cls(key=key, value=value, pack_key=pack_key, pack_value=pack_value)

    @property
    def buffers(self) -> int:
        return int(self.key.shape[0])

    @property
    def chunk_blocks(self) -> int:
        return int(self.key.shape[1])

    @property
    def block_size(self) -> int:
        return int(self.key.shape[2])

    @property
    def chunk_tokens(self) -> int:
        return self.chunk_blocks * self.block_size

    @property
    def device(self) -> torch.device:
        return self.key.device

    def validate(self) -> None:
        for name, t in (("scratch.key", self.key), ("scratch.value", self.value)):
            if not isinstance(t, torch.Tensor):
                raise KernelInputError(f"{name} must be a torch.Tensor")
            require_ndim(name, t, 5, "[buffers, chunk_blocks, block_size, Hkv, D]")
            require_dtype(name, t, KV_DTYPES)
            if not t.is_contiguous():
                raise KernelInputError(
                    f"{name} must be contiguous (allocate it with StagingScratch.allocate); "
                    f"got strides {tuple(t.stride())}"
                )
        if self.key.shape != self.value.shape or self.key.dtype != self.value.dtype:
            raise KernelInputError(
                f"scratch.key and scratch.value must match; got {describe(self.key)} and "
                f"{describe(self.value)}"
            )
        if not same_device(self.key.device, self.value.device):
            raise KernelInputError("scratch.key and scratch.value must be on one device")
        for name, p in (
            ("scratch.pack_key", self.pack_key),
            ("scratch.pack_value", self.pack_value),
        ):
            if p is not None and (p.shape != self.key.shape or p.dtype != self.key.dtype):
                raise KernelInputError(
                    f"{name} must match scratch.key ({tuple(self.key.shape)}, {self.key.dtype});"
                    f" got {describe(p)}"
                )


def stage_blocks(
    src_key: torch.Tensor,
    src_value: torch.Tensor,
    block_ids: torch.Tensor,
    dst_key: torch.Tensor,
    dst_value: torch.Tensor,
    *,
    strategy: GatherStrategy,
    device_ids: torch.Tensor | None = None,
    pack_key: torch.Tensor | None = None,
    pack_value: torch.Tensor | None = None,
    programs: int | None = None,
    kernel: GatherKernel = GatherKernel.TRITON,
    stream: Any = None,
) -> None:
    """Enqueue on the current stream: ``dst[i] = src[block_ids[i]]`` for K and V.

    ``strategy`` must already be resolved (not AUTO). Arguments are trusted: the public
    entry points validate them. ``block_ids`` is a host int64 tensor; ``device_ids`` the
    same ids on the device (``gpu_gather`` with the Triton kernel); ``pack_*`` host pack
    buffers (``cpu_pack`` with an accelerator); ``programs`` caps the ``gpu_gather`` grid
    (None: its default). ``kernel`` (resolved, not AUTO) picks the ``gpu_gather`` kernel:
    with :attr:`GatherKernel.CUDA`, ``block_ids`` must be a contiguous *pinned* int64 tensor
    left unchanged until the launch has run, and the launch goes to ``stream`` (a
    ``torch.cuda.Stream``; None: the current one) without switching torch's current stream.
    ``copy_batch`` takes ``stream`` the same way and a contiguous host int64 ``block_ids``,
    read before this returns.
    """
    n = int(block_ids.numel())
    if n == 0:
        return
    if strategy is GatherStrategy.COPY_BATCH:
        gather_cuda.copy_blocks_batched(
            src_key, src_value, block_ids, dst_key, dst_value, stream=stream
        )
        return
    if strategy is GatherStrategy.GPU_GATHER and kernel is GatherKernel.CUDA:
        gather_cuda.gather_kv_blocks_from_host(
            src_key, src_value, block_ids, dst_key, dst_value, programs=programs, stream=stream
        )
        return
    if strategy is GatherStrategy.GPU_GATHER:
        from servelab.kernels.gather_triton import gather_kv_blocks_from_host

        if device_ids is None:
            raise KernelInputError("gpu_gather needs the block ids on the device (device_ids)")
        gather_kv_blocks_from_host(
            src_key, src_value, device_ids, dst_key[:n], dst_value[:n], programs=programs
        )
        return
    for src, dst, pack in ((src_key, dst_key, pack_key), (src_value, dst_value, pack_value)):
        _stage_one(src, block_ids, dst[:n], strategy, None if pack is None else pack[:n])


def _stage_one(
    src: torch.Tensor,
    ids: torch.Tensor,
    dst: torch.Tensor,
    strategy: GatherStrategy,
    pack: torch.Tensor | None,
) -> None:
    if strategy is GatherStrategy.CPU_PACK:
        if dst.device.type == "cpu":
            torch.index_select(src, 0, ids, out=dst)
            return
        if pack is None:
            raise KernelInputError(
                "cpu_pack on an accelerator needs pinned pack buffers: allocate the scratch "
                "with StagingScratch.allocate(..., with_pack=True)"
            )
        torch.index_select(src, 0, ids, out=pack)
        dst.copy_(pack, non_blocking=True)
        return
    id_list: list[int] = ids.tolist()
    if strategy is GatherStrategy.COALESCED and is_dense_blocks(src):
        for d, s, length in block_runs(id_list):
            dst[d : d + length].copy_(src[s : s + length], non_blocking=True)
        return
    for i, b in enumerate(id_list):
        dst[i].copy_(src[b], non_blocking=True)
