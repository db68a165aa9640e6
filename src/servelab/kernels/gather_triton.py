"""Triton gather of KV blocks out of pinned host memory into a dense device buffer.

Pinned (page-locked) host memory is mapped into the device's address space under unified
virtual addressing, so a kernel can load from it directly; Triton's launcher translates the
host tensor's pointer with ``cuPointerGetAttribute`` and rejects pageable memory. Each
program moves tiles of the chunk's blocks (keys, then values, in one launch), so thousands
of independent 16-byte loads are in flight over PCIe at once, and the block size and order
stop mattering (a per-block ``cudaMemcpyAsync`` pays a fixed cost per block instead).

The grid is persistent and capped (``programs``): an uncapped grid would fill every SM's
thread slots for the whole transfer and hold back the attention kernels of the previous
chunk that should run beside it.

Bytes move as ``uint8``, so any dtype (and any NaN payload) arrives bit-exact.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from servelab.kernels.paged_cache import block_bytes

# Bytes per tile: 16 KiB keeps ~128 B of loads per thread in flight at 4 warps.
TILE_BYTES = 16384
# Programs in the persistent grid (run 4 in docs/history/paged-attention-design-log.md). Each
# one holds an SM slot for the whole transfer, so the cap is what leaves SMs to the attention
# of the previous chunk; 32 programs keep enough loads in flight to fill the link (the sweep
# there).
PROGRAMS = 32


@triton.jit  # type: ignore[untyped-decorator]
def _gather_kv_blocks_kernel(  # type: ignore[no-untyped-def]
    k_src,
    v_src,
    k_dst,
    v_dst,
    ids_ptr,
    k_src_stride,
    v_src_stride,
    dst_stride,
    block_bytes,
    num_tiles,
    tiles_per_block,
    TILE: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    lane = tl.arange(0, TILE)
    # Keys, then values: one launch per chunk keeps host overhead down.
    for t in tl.range(pid, num_tiles, nprog):
        blk = t // tiles_per_block
        offs = (t % tiles_per_block).to(tl.int64) * TILE + lane
        mask = offs < block_bytes
        src_block = tl.load(ids_ptr + blk).to(tl.int64)
        data = tl.load(k_src + src_block * k_src_stride + offs, mask=mask)
        tl.store(k_dst + blk.to(tl.int64) * dst_stride + offs, data, mask=mask)
    for t in tl.range(pid, num_tiles, nprog):
        blk = t // tiles_per_block
        offs = (t % tiles_per_block).to(tl.int64) * TILE + lane
        mask = offs < block_bytes
        src_block = tl.load(ids_ptr + blk).to(tl.int64)
        data = tl.load(v_src + src_block * v_src_stride + offs, mask=mask)
        tl.store(v_dst + blk.to(tl.int64) * dst_stride + offs, data, mask=mask)


def gather_kv_blocks_from_host(
    src_key: torch.Tensor,
    src_value: torch.Tensor,
    device_ids: torch.Tensor,
    dst_key: torch.Tensor,
    dst_value: torch.Tensor,
    *,
    tile_bytes: int = TILE_BYTES,
    programs: int | None = None,
    num_warps: int = 4,
) -> None:
    """Enqueue on the current CUDA stream: ``dst[i] = src[device_ids[i]]`` for K and V,
    byte for byte, in one launch.

    ``src_*`` are pinned host caches ``[N, block_size, Hkv, D]`` with dense blocks (any block
    stride); ``dst_*`` contiguous device buffers of ``len(device_ids)`` blocks; ``device_ids``
    int32/int64 on the device. Trusted arguments (validated by the caller); ``tile_bytes``
    (a power of two), ``programs`` (None: :data:`PROGRAMS`) and ``num_warps`` are tuning
    knobs.
    """
    n = int(device_ids.numel())
    if n == 0:
        return
    elem, nbytes = src_key.element_size(), block_bytes(src_key)
    tiles_per_block = triton.cdiv(nbytes, tile_bytes)
    num_tiles = n * tiles_per_block
    grid = (min(num_tiles, PROGRAMS if programs is None else programs),)
    _gather_kv_blocks_kernel[grid](
        src_key.view(torch.uint8),
        src_value.view(torch.uint8),
        dst_key.view(torch.uint8),
        dst_value.view(torch.uint8),
        device_ids,
        src_key.stride(0) * elem,
        src_value.stride(0) * elem,
        dst_key.stride(0) * elem,
        nbytes,
        num_tiles,
        tiles_per_block,
        TILE=tile_bytes,
        num_warps=num_warps,
    )
