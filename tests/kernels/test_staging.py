"""Staging host blocks into the device scratch: byte-exact for every strategy and layout."""

from __future__ import annotations

import pytest
import torch

from servelab.errors import KernelInputError
from servelab.kernels.paged_cache import PagedKVCache
from servelab.kernels.staging import (
    GatherStrategy,
    StagingScratch,
    block_runs,
    gpu_gather_supported,
    resolve_strategy,
    stage_blocks,
)
from servelab.kernels.validation import check_block_ids

pytestmark = pytest.mark.kernels


def _random_bits_cache(
    gen: torch.Generator,
    num_blocks: int,
    block: int,
    heads: int,
    head: int,
    dtype: torch.dtype,
    pinned: bool,
    interleaved: bool,
) -> PagedKVCache:
    """A host cache holding random bit patterns (NaN payloads and infinities included)."""
    cache = PagedKVCache.allocate(
        num_blocks=num_blocks,
        block_size=block,
        num_kv_heads=heads,
        head_size=head,
        dtype=dtype,
        device="cpu",
        pin_memory=pinned,
        interleaved=interleaved,
    )
    itype = {2: torch.int16, 4: torch.int32}[torch.empty(0, dtype=dtype).element_size()]
    for t in (cache.key, cache.value):
        info = torch.iinfo(itype)
        bits = torch.randint(info.min, info.max, t.shape, generator=gen, dtype=torch.int64)
        t.view(itype).copy_(bits.to(itype))
    return cache


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8).cpu()


ROUND_TRIPS = [
    (16, torch.bfloat16, False, "random"),
    (32, torch.float16, True, "random"),
    (256, torch.bfloat16, False, "runs"),
    (16, torch.float32, True, "runs"),
    (32, torch.bfloat16, False, "reversed"),
]


@pytest.mark.parametrize("pinned", [True, False], ids=["pinned", "pageable"])
@pytest.mark.parametrize(
    ("block", "dtype", "interleaved", "table"),
    ROUND_TRIPS,
    ids=[
        f"bs{b}-{str(d).removeprefix('torch.')}-{'kvi' if i else 'split'}-{t}"
        for b, d, i, t in ROUND_TRIPS
    ],
)
def test_round_trip_is_byte_exact(
    device: torch.device,
    torch_gen: torch.Generator,
    pinned: bool,
    block: int,
    dtype: torch.dtype,
    interleaved: bool,
    table: str,
) -> None:
    if pinned and device.type == "cpu":
        pytest.skip("pinned memory needs an accelerator")
    heads, head, num_blocks, take = 2, 64, 40, 23
    cache = _random_bits_cache(
        torch_gen, num_blocks, block, heads, head, dtype, pinned, interleaved
    )
    if table == "random":
        ids = torch.randperm(num_blocks, generator=torch_gen)[:take]
    elif table == "runs":  # a few runs of consecutive ids, as a real allocator leaves them
        starts = torch.randperm(num_blocks - 6, generator=torch_gen)[:4].tolist()
        ids = torch.tensor([s + j for s in starts for j in range(5)][:take])
    else:
        ids = torch.arange(num_blocks - 1, num_blocks - 1 - take, -1)
    ids = ids.to(torch.int64)
    scratch = StagingScratch.allocate(
        chunk_blocks=len(ids) + 2,
        block_size=block,
        num_kv_heads=heads,
        head_size=head,
        dtype=dtype,
        device=device,
        buffers=1,
        with_pack=True,
    )
    strategies = [GatherStrategy.PER_BLOCK, GatherStrategy.COALESCED, GatherStrategy.CPU_PACK]
    if gpu_gather_supported(cache.key, device):
        strategies.append(GatherStrategy.GPU_GATHER)
    want_k, want_v = _bits(cache.key[ids]), _bits(cache.value[ids])
    for strategy in strategies:
        scratch.key.fill_(float("nan"))
        scratch.value.fill_(float("nan"))
        stage_blocks(
            cache.key,
            cache.value,
            ids,
            scratch.key[0],
            scratch.value[0],
            strategy=strategy,
            device_ids=ids.to(device),
            pack_key=None if scratch.pack_key is None else scratch.pack_key[0],
            pack_value=None if scratch.pack_value is None else scratch.pack_value[0],
        )
        got_k, got_v = _bits(scratch.key[0, : len(ids)]), _bits(scratch.value[0, : len(ids)])
        assert torch.equal(got_k, want_k), strategy
        assert torch.equal(got_v, want_v), strategy
        # Blocks past the staged ones stay untouched.
        assert torch.isnan(scratch.key[0, len(ids) :]).all(), strategy


def test_block_runs() -> None:
    assert block_runs([]) == []
    assert block_runs([3]) == [(0, 3, 1)]
    assert block_runs([1, 2, 3, 7, 8, 0]) == [(0, 1, 3), (3, 7, 2), (5, 0, 1)]
    assert block_runs([5, 4, 3]) == [(0, 5, 1), (1, 4, 1), (2, 3, 1)]


def test_resolve_strategy(device: torch.device) -> None:
    host = torch.zeros(4, 16, 2, 8)
    assert resolve_strategy("per_block", host, device) is GatherStrategy.PER_BLOCK
    if device.type == "cpu":
        assert resolve_strategy("auto", host, device) is GatherStrategy.CPU_PACK
    with pytest.raises(KernelInputError, match="strategy must be one of"):
        resolve_strategy("dma", host, device)
    if not gpu_gather_supported(host, device):
        with pytest.raises(KernelInputError, match="'gpu_gather' needs a CUDA device"):
            resolve_strategy("gpu_gather", host, device)


def test_check_block_ids() -> None:
    check_block_ids("t", torch.tensor([0, 3, 2]), num_blocks=4, needed=3)
    check_block_ids("t", torch.tensor([9, 9]), num_blocks=4, needed=0)  # unused ids ignored
    with pytest.raises(KernelInputError, match=r"t has block ids in \[0, 4\]"):
        check_block_ids("t", torch.tensor([0, 4]), num_blocks=4, needed=2)
    with pytest.raises(KernelInputError, match="t must be 1-D"):
        check_block_ids("t", torch.zeros(2, 2, dtype=torch.int64), num_blocks=4, needed=1)


def test_scratch_allocate_rejects_bad_sizes() -> None:
    with pytest.raises(KernelInputError, match="chunk_blocks must be >= 1"):
        StagingScratch.allocate(
            chunk_blocks=0,
            block_size=16,
            num_kv_heads=2,
            head_size=64,
            dtype=torch.bfloat16,
            device="cpu",
        )
    with pytest.raises(KernelInputError, match="scratch dtype must be one of"):
        StagingScratch.allocate(
            chunk_blocks=1,
            block_size=16,
            num_kv_heads=2,
            head_size=64,
            dtype=torch.int8,
            device="cpu",
        )
