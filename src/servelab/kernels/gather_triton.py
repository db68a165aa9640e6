"""Triton gather of KV blocks out of pinned host memory into a dense device buffer.

Pinned (page-locked) host memory is mapped into the device's address space under unified
virtual addressing, so a kernel can load from it directly; Triton's launcher translates the
host tensor's pointer with ``cuPointerGetAttribute`` and rejects pageable memory. Each
program moves tiles of the chunk's blocks, so thousands of independent 16-byte loads are in
flight over PCIe at once, and the block size and order stop mattering (a per-block
``cudaMemcpyAsync`` pays a fixed cost per block instead).

The grid is persistent and capped (``programs``): an uncapped grid would fill every SM's
thread slots for the whole transfer and hold back the attention kernels of the previous
chunk that should run beside it.

Bytes move as ``uint8``, so any dtype (and any NaN payload) arrives bit-exact.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Bytes per tile: 16 KiB keeps ~128 B of loads per thread in flight at 4 warps.
TILE_BYTES = 16384
# Programs in the persistent grid; measured in docs/kernels-paged.md.
PROGRAMS = 128


@triton.jit  # type: ignore[untyped-decorator]
def _gather_blocks_kernel(  # type: ignore[no-untyped-def]
    src_ptr,
    dst_ptr,
    ids_ptr,
    src_block_stride,
    dst_block_stride,
    block_bytes,
    num_tiles,
    tiles_per_block,
    TILE: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    lane = tl.arange(0, TILE)
    for t in tl.range(pid, num_tiles, nprog):
        blk = t // tiles_per_block
        offs = (t % tiles_per_block).to(tl.int64) * TILE + lane
        mask = offs < block_bytes
        src_block = tl.load(ids_ptr + blk).to(tl.int64)
        data = tl.load(src_ptr + src_block * src_block_stride + offs, mask=mask)
        tl.store(dst_ptr + blk.to(tl.int64) * dst_block_stride + offs, data, mask=mask)


def gather_blocks_from_host(
    src: torch.Tensor,
    device_ids: torch.Tensor,
    dst: torch.Tensor,
    *,
    tile_bytes: int = TILE_BYTES,
    programs: int = PROGRAMS,
    num_warps: int = 4,
) -> None:
    """Enqueue on the current CUDA stream: ``dst[i] = src[device_ids[i]]`` byte for byte.

    ``src`` is a pinned host cache ``[N, block_size, Hkv, D]`` with dense blocks (any block
    stride); ``dst`` a device buffer of ``len(device_ids)`` dense blocks; ``device_ids``
    int32/int64 on the device. Trusted arguments (validated by the caller); ``tile_bytes``
    (a power of two), ``programs`` and ``num_warps`` are tuning knobs for benchmarks.
    """
    n = int(device_ids.numel())
    if n == 0:
        return
    elem = src.element_size()
    block_bytes = src[0].numel() * elem
    tiles_per_block = triton.cdiv(block_bytes, tile_bytes)
    num_tiles = n * tiles_per_block
    grid = (min(num_tiles, programs),)
    _gather_blocks_kernel[grid](
        src.view(torch.uint8),
        dst.view(torch.uint8),
        device_ids,
        src.stride(0) * elem,
        dst.stride(0) * elem,
        block_bytes,
        num_tiles,
        tiles_per_block,
        TILE=tile_bytes,
        num_warps=num_warps,
    )
