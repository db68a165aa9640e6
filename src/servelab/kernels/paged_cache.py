"""Paged KV caches: one layer's keys and values in fixed-size blocks, addressed by block tables."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from servelab.errors import KernelInputError
from servelab.kernels.validation import (
    KV_DTYPES,
    check_block_ids,
    check_cache_tensor,
    describe,
    require_int,
    require_shape,
    same_device,
)


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def block_bytes(cache: torch.Tensor) -> int:
    """Bytes of one block of a cache tensor ``[num_blocks, block_size, Hkv, D]`` (K or V)."""
    return int(cache.shape[1]) * int(cache.shape[2]) * int(cache.shape[3]) * cache.element_size()


@dataclass(frozen=True)
class PagedKVCache:
    """One layer's paged KV: ``key``/``value`` ``[num_blocks, block_size, Hkv, D]``.

    Blocks must be dense inside (row-major ``[block_size, Hkv, D]``); the block stride may be
    larger, so ``key``/``value`` can be views of one ``[num_blocks, 2, ...]`` tensor.
    """

    key: torch.Tensor
    value: torch.Tensor

    @classmethod
    def allocate(
        cls,
        *,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
        pin_memory: bool = False,
        interleaved: bool = False,
    ) -> PagedKVCache:
        """Uninitialised cache; ``pin_memory`` for a host cache that an accelerator reads;
        ``interleaved`` stores block ``i``'s K and V next to each other
        (``[num_blocks, 2, block_size, Hkv, D]``)."""
        for name, v in (
            ("num_blocks", num_blocks),
            ("block_size", block_size),
            ("num_kv_heads", num_kv_heads),
            ("head_size", head_size),
        ):
            require_int(name, v, minimum=1)
        if dtype not in KV_DTYPES:
            raise KernelInputError(f"cache dtype must be one of {KV_DTYPES}; got {dtype}")
        dev = torch.device(device)
        if pin_memory and dev.type != "cpu":
            raise KernelInputError(f"pin_memory applies to host caches only; got device {dev}")
        inner = (block_size, num_kv_heads, head_size)
        if interleaved:
            both = torch.empty(
                (num_blocks, 2, *inner), dtype=dtype, device=dev, pin_memory=pin_memory
            )
            return cls(key=both[:, 0], value=both[:, 1])
        return cls(
            key=torch.empty((num_blocks, *inner), dtype=dtype, device=dev, pin_memory=pin_memory),
            value=torch.empty((num_blocks, *inner), dtype=dtype, device=dev, pin_memory=pin_memory),
        )

    @property
    def num_blocks(self) -> int:
        return int(self.key.shape[0])

    @property
    def block_size(self) -> int:
        return int(self.key.shape[1])

    @property
    def num_kv_heads(self) -> int:
        return int(self.key.shape[2])

    @property
    def head_size(self) -> int:
        return int(self.key.shape[3])

    @property
    def dtype(self) -> torch.dtype:
        return self.key.dtype

    @property
    def device(self) -> torch.device:
        return self.key.device

    def validate(self, name: str) -> None:
        check_cache_tensor(f"{name}.key", self.key)
        check_cache_tensor(f"{name}.value", self.value)
        if self.key.shape != self.value.shape or self.key.dtype != self.value.dtype:
            raise KernelInputError(
                f"{name}.key and {name}.value must match; got {describe(self.key)} and "
                f"{describe(self.value)}"
            )
        if not same_device(self.key.device, self.value.device):
            raise KernelInputError(f"{name}.key and {name}.value must be on one device")

    def write(self, block_table: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store tokens ``key``/``value`` ``[S, Hkv, D]`` into the blocks of ``block_table``."""
        num_tokens = int(key.shape[0])
        needed = blocks_for(num_tokens, self.block_size)
        check_block_ids("block_table", block_table, self.num_blocks, needed)
        for tokens, cache in ((key, self.key), (value, self.value)):
            require_shape(
                "tokens", tokens, (num_tokens, self.num_kv_heads, self.head_size), "[S, Hkv, D]"
            )
            for i in range(needed):
                t0, t1 = i * self.block_size, min(num_tokens, (i + 1) * self.block_size)
                cache[int(block_table[i])][: t1 - t0].copy_(tokens[t0:t1])

    def read(self, block_table: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Contiguous copies ``[num_tokens, Hkv, D]`` of the first ``num_tokens`` tokens."""
        needed = blocks_for(num_tokens, self.block_size)
        ids = block_table[:needed].to(device=self.device, dtype=torch.int64)
        shape = (needed * self.block_size, self.num_kv_heads, self.head_size)
        k = self.key.index_select(0, ids).reshape(shape)[:num_tokens]
        v = self.value.index_select(0, ids).reshape(shape)[:num_tokens]
        return k, v
