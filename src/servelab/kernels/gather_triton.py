"""Triton gather of KV blocks out of pinned host memory into a dense device buffer.

Pinned (page-locked) host memory is mapped into the device's address space under unified
virtual addressing, so a kernel can load from it directly; Triton's launcher translates the
host tensor's pointer with ``cuPointerGetAttribute`` and rejects pageable memory. Each
program moves one tile of one block, so thousands of independent 16-byte loads are in
flight over PCIe at once, and the block size and order stop mattering (a per-block
``cudaMemcpyAsync`` pays a fixed cost per block instead).

Bytes move as ``uint8``, so any dtype (and any NaN payload) arrives bit-exact.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Bytes per program: 16 KiB keeps ~128 B of loads per thread in flight at 4 warps.
_TILE_BYTES = 16384


@triton.jit  # type: ignore[untyped-decorator]
def _gather_blocks_kernel(  # type: ignore[no-untyped-def]
    src_ptr,
    dst_ptr,
    ids_ptr,
    src_block_stride,
    dst_block_stride,
    block_bytes,
    TILE: tl.constexpr,
):
    blk = tl.program_id(0)
    tile = tl.program_id(1)
    src_block = tl.load(ids_ptr + blk).to(tl.int64)
    offs = tile.to(tl.int64) * TILE + tl.arange(0, TILE)
    mask = offs < block_bytes
    data = tl.load(src_ptr + src_block * src_block_stride + offs, mask=mask)
    tl.store(dst_ptr + blk.to(tl.int64) * dst_block_stride + offs, data, mask=mask)


def _bytes_view(t: torch.Tensor) -> torch.Tensor:
    """The same memory as uint8; the last dimension must be contiguous."""
    return t.view(torch.uint8)


def gather_blocks_from_host(src: torch.Tensor, device_ids: torch.Tensor, dst: torch.Tensor) -> None:
    """Enqueue on the current CUDA stream: ``dst[i] = src[device_ids[i]]`` byte for byte.

    ``src`` is a pinned host cache ``[N, block_size, Hkv, D]`` with dense blocks (any block
    stride); ``dst`` a device buffer of ``len(device_ids)`` dense blocks; ``device_ids``
    int32/int64 on the device. Trusted arguments (validated by the caller).
    """
    n = int(device_ids.numel())
    if n == 0:
        return
    elem = src.element_size()
    block_bytes = src[0].numel() * elem
    src_bytes = _bytes_view(src)
    dst_bytes = _bytes_view(dst)
    grid = (n, triton.cdiv(block_bytes, _TILE_BYTES))
    _gather_blocks_kernel[grid](
        src_bytes,
        dst_bytes,
        device_ids,
        src.stride(0) * elem,
        dst.stride(0) * elem,
        block_bytes,
        TILE=_TILE_BYTES,
        num_warps=4,
    )
