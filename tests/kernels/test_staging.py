"""Staging host blocks into the device scratch: byte-exact for every strategy and layout."""

from __future__ import annotations

import pytest
import torch

from servelab.errors import KernelInputError
from servelab.kernels import cuda_ext, gather_cuda
from servelab.kernels.gather_cuda import IdRing
from servelab.kernels.paged_cache import PagedKVCache, block_bytes
from servelab.kernels.staging import (
    COPY_BATCH_MIN_BLOCK_BYTES,
    GatherKernel,
    GatherStrategy,
    StagingScratch,
    block_runs,
    gpu_gather_supported,
    resolve_gather_kernel,
    resolve_strategy,
    stage_blocks,
    triton_available,
)
from servelab.kernels.validation import CheckMemo, check_block_ids

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
    runs = [
        (s, GatherKernel.TRITON)
        for s in (GatherStrategy.PER_BLOCK, GatherStrategy.COALESCED, GatherStrategy.CPU_PACK)
    ]
    if gpu_gather_supported(cache.key, device) and triton_available():
        runs.append((GatherStrategy.GPU_GATHER, GatherKernel.TRITON))
    if gather_cuda.available(cache.key, device):
        runs.append((GatherStrategy.GPU_GATHER, GatherKernel.CUDA))
    if gather_cuda.copy_batch_available(cache.key, device):
        runs.append((GatherStrategy.COPY_BATCH, GatherKernel.TRITON))  # kernel: unused
    want_k, want_v = _bits(cache.key[ids]), _bits(cache.value[ids])
    for strategy, kernel in runs:
        scratch.key.fill_(float("nan"))
        scratch.value.fill_(float("nan"))
        stage_blocks(
            cache.key,
            cache.value,
            _pinned(ids) if kernel is GatherKernel.CUDA else ids,
            scratch.key[0],
            scratch.value[0],
            strategy=strategy,
            device_ids=ids.to(device),
            pack_key=None if scratch.pack_key is None else scratch.pack_key[0],
            pack_value=None if scratch.pack_value is None else scratch.pack_value[0],
            kernel=kernel,
        )
        _assert_staged(scratch, want_k, want_v, len(ids), (strategy, kernel))


def _pinned(ids: torch.Tensor) -> torch.Tensor:
    return ids.to(torch.int64).pin_memory()


def _assert_staged(
    scratch: StagingScratch, want_k: torch.Tensor, want_v: torch.Tensor, n: int, what: object
) -> None:
    got_k, got_v = _bits(scratch.key[0, :n]), _bits(scratch.value[0, :n])
    assert torch.equal(got_k, want_k), what
    assert torch.equal(got_v, want_v), what
    # Blocks past the staged ones stay untouched.
    assert torch.isnan(scratch.key[0, n:]).all(), what
    assert torch.isnan(scratch.value[0, n:]).all(), what


def _cuda_gather_reason(device: torch.device) -> str | None:
    """Why the CUDA gather cannot run here (None: it can)."""
    if device.type != "cuda":
        return f"the CUDA gather needs a CUDA device; the test device is {device}"
    if not cuda_ext.enabled(device):
        return "the CUDA gather needs nvcc ($CUDA_HOME/bin, /usr/local/cuda/bin or PATH)"
    return None


CUDA_CASES = [
    # block, heads, head, dtype, interleaved, table, blocks in the cache, ids taken
    (16, 2, 64, torch.bfloat16, False, "random", 40, 23),
    (32, 2, 64, torch.float16, True, "random", 40, 23),
    (256, 8, 128, torch.bfloat16, False, "runs", 24, 17),
    (16, 2, 64, torch.float32, True, "reversed", 40, 23),
    (1, 1, 8, torch.float16, False, "random", 5000, 4500),  # 16-byte blocks; 2 launches
]


def _case_id(c: tuple[object, ...]) -> str:
    dtype = str(c[3]).removeprefix("torch.")
    return f"bs{c[0]}-h{c[1]}-d{c[2]}-{dtype}-{'kvi' if c[4] else 'split'}-{c[5]}-n{c[7]}"


CASE_ARGS = ("block", "heads", "head", "dtype", "interleaved", "table", "num_blocks", "take")


# The two ways through the C library: the CUDA gather (programs, threads) and the copy engines'
# batch (on a side stream, or on the legacy default stream, which the API refuses: there it
# issues one copy a run).
WAYS = [
    ("gather", None, gather_cuda.THREADS),
    ("gather", 1, 32),
    ("gather", 7, 512),
    ("batch-side-stream", None, 0),
    ("batch-default-stream", None, 0),
]


@pytest.mark.parametrize(CASE_ARGS, CUDA_CASES, ids=[_case_id(c) for c in CUDA_CASES])
@pytest.mark.parametrize(
    ("way", "programs", "threads"), WAYS, ids=[f"{w}-{p}-{t}" if t else w for w, p, t in WAYS]
)
def test_cuda_staging_round_trip_is_byte_exact(
    device: torch.device,
    torch_gen: torch.Generator,
    block: int,
    heads: int,
    head: int,
    dtype: torch.dtype,
    interleaved: bool,
    table: str,
    num_blocks: int,
    take: int,
    way: str,
    programs: int | None,
    threads: int,
) -> None:
    """Random bit patterns through the CUDA gather (every grid and CTA size; more ids than
    one launch takes, 4096, in the last case) and the copy engines' batch (runs of ids merge
    only in a dense cache), split and interleaved layouts. The batch reads its ids during the
    call: overwriting them as soon as it returns changes nothing."""
    reason = _cuda_gather_reason(device)
    if reason:
        pytest.skip(reason)
    cache = _random_bits_cache(torch_gen, num_blocks, block, heads, head, dtype, True, interleaved)
    if way != "gather" and not gather_cuda.copy_batch_available(cache.key, device):
        pytest.skip("cudaMemcpyBatchAsync is missing from this runtime or driver (CUDA < 12.8)")
    ids = _table(torch_gen, table, num_blocks, take)
    want_k, want_v = _bits(cache.key[ids]), _bits(cache.value[ids])
    scratch = StagingScratch.allocate(
        chunk_blocks=take + 2, block_size=block, num_kv_heads=heads, head_size=head,
        dtype=dtype, device=device, buffers=1,
    )  # fmt: skip
    scratch.key.fill_(float("nan"))
    scratch.value.fill_(float("nan"))
    k_dst, v_dst = scratch.key[0], scratch.value[0]
    if way == "gather":
        gather_cuda.gather_kv_blocks_from_host(
            cache.key, cache.value, _pinned(ids), k_dst, v_dst, programs=programs, threads=threads
        )
        assert gather_cuda.vector_bytes(cache.key, cache.value, k_dst, v_dst) == 16
    else:
        stream = torch.cuda.default_stream(device)
        if way == "batch-side-stream":
            stream = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        assert (stream.cuda_stream != 0) is (way == "batch-side-stream")
        gather_cuda.copy_blocks_batched(cache.key, cache.value, ids, k_dst, v_dst, stream=stream)
        ids.fill_(0)
        stream.synchronize()
    _assert_staged(scratch, want_k, want_v, take, way)


def _table(gen: torch.Generator, kind: str, num_blocks: int, take: int) -> torch.Tensor:
    if kind == "random":
        ids = torch.randperm(num_blocks, generator=gen)[:take]
    elif kind == "runs":  # a few runs of consecutive ids, as a real allocator leaves them
        starts = torch.randperm(num_blocks - 6, generator=gen)[:4].tolist()
        ids = torch.tensor([s + j for s in starts for j in range(5)][:take])
    else:
        ids = torch.arange(num_blocks - 1, num_blocks - 1 - take, -1)
    return ids.to(torch.int64)


@pytest.mark.parametrize("offset", [2, 4, 8], ids=lambda o: f"align{o}")
def test_cuda_gather_narrow_vectors_on_unaligned_memory(
    device: torch.device, torch_gen: torch.Generator, offset: int
) -> None:
    """Source and destination shifted by ``offset`` bytes: the kernel drops to ``offset``-byte
    loads and stays byte-exact."""
    reason = _cuda_gather_reason(device)
    if reason:
        pytest.skip(reason)
    num_blocks, block, heads, head, take = 30, 16, 2, 64, 19
    shape = (num_blocks, block, heads, head)
    numel = num_blocks * block * heads * head
    raw = torch.empty(2 * (2 * numel + 16), dtype=torch.uint8).pin_memory()
    bits = torch.randint(0, 256, (raw.numel(),), generator=torch_gen, dtype=torch.int64)
    raw.copy_(bits.to(torch.uint8))
    both = raw[offset : offset + 4 * numel].view(torch.float16)
    key, value = both[:numel].view(shape), both[numel:].view(shape)
    dst_raw = torch.full((2 * (2 * take * block * heads * head) + 16,), 0xFF, dtype=torch.uint8,
                         device=device)  # fmt: skip
    n = take * block * heads * head
    dst = dst_raw[offset : offset + 4 * n].view(torch.float16)
    dst_k, dst_v = dst[:n].view(take, block, heads, head), dst[n:].view(take, block, heads, head)
    ids = torch.randperm(num_blocks, generator=torch_gen)[:take]
    assert gather_cuda.vector_bytes(key, value, dst_k, dst_v) == offset
    gather_cuda.gather_kv_blocks_from_host(key, value, _pinned(ids), dst_k, dst_v)
    assert torch.equal(_bits(dst_k), _bits(key[ids]))
    assert torch.equal(_bits(dst_v), _bits(value[ids]))


def test_resolve_gather_kernel(device: torch.device) -> None:
    host = torch.zeros(4, 16, 2, 8)
    with pytest.raises(KernelInputError, match="gather_kernel must be one of"):
        resolve_gather_kernel("ptx", host, device)
    # A pageable source never takes the CUDA gather (its pointer is not mapped).
    assert resolve_gather_kernel("auto", host, device) is GatherKernel.TRITON
    with pytest.raises(KernelInputError, match="gather_kernel='cuda' needs a CUDA device"):
        resolve_gather_kernel("cuda", host, device)


class _FakeGuard:
    """An event that records whether the ring waited on it."""

    def __init__(self) -> None:
        self.waited = 0

    def synchronize(self) -> None:
        self.waited += 1


def test_id_ring_waits_before_reuse_and_grows() -> None:
    allocated: list[int] = []

    def allocate(n: int) -> torch.Tensor:
        allocated.append(n)
        return torch.empty(n, dtype=torch.int64)

    ring = IdRing(slots=2, allocate=allocate)
    s0, b0 = ring.acquire(10)
    g0 = _FakeGuard()
    ring.guard(s0, g0)
    s1, b1 = ring.acquire(10)
    assert (s0, s1) == (0, 1) and b0.data_ptr() != b1.data_ptr()
    assert g0.waited == 0, "a slot is waited on only when it comes round again"
    ring.guard(s1, _FakeGuard())
    later = _FakeGuard()
    ring.guard(s0, later)  # a later launch read slot 0 too: that is the event to wait on
    s2, b2 = ring.acquire(10)
    assert s2 == 0 and b2.data_ptr() == b0.data_ptr()
    assert later.waited == 1 and g0.waited == 0
    s3, _ = ring.acquire(10)
    assert s3 == 1
    # Growing a slot: the old buffer is dropped only after its guard was waited on.
    g = _FakeGuard()
    ring.guard(0, g)
    s4, b4 = ring.acquire(1000)
    assert s4 == 0 and g.waited == 1 and b4.numel() >= 1000
    assert allocated == [256, 256, 1000]
    # A guard is waited on once; an unguarded slot (no launch read it) is handed out at once.
    ring.acquire(1)
    ring.acquire(1)
    assert g.waited == 1
    with pytest.raises(ValueError, match="at least one slot"):
        IdRing(slots=0)


def test_check_memo_sees_identity_and_layout() -> None:
    memo = CheckMemo(capacity=2)
    a = torch.zeros(4, 4)
    memo.put((a,), "k", "ok")
    assert memo.get((a,), "k") == "ok"
    assert memo.get((a,), "other") is None
    assert memo.get((a.clone(),), "k") is None  # another tensor, same layout
    a.resize_(2, 8)  # same object, new shape
    assert memo.get((a,), "k") is None
    b, c = torch.zeros(1), torch.zeros(1)
    memo.put((a,), "k", 1)
    memo.put((b,), "k", 2)
    memo.put((c,), "k", 3)  # capacity 2: the oldest entry goes
    assert memo.get((a,), "k") is None and memo.get((b,), "k") == 2
    memo.clear()
    assert memo.get((b,), "k") is None


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
    # A pageable source never takes the copy engines' batch (nor does a CPU device).
    with pytest.raises(KernelInputError, match=r"'copy_batch' needs a CUDA device.*pinned=False"):
        resolve_strategy("copy_batch", host, device)
    # auto: the copy engines' batch for blocks of 64 KiB and more, the gather below.
    small = torch.zeros(2, 32, 4, 128, dtype=torch.bfloat16)  # 32 KiB blocks
    large = torch.zeros(2, 64, 4, 128, dtype=torch.bfloat16)  # 64 KiB blocks
    assert block_bytes(small) == COPY_BATCH_MIN_BLOCK_BYTES // 2 == 32 * 1024
    assert block_bytes(large) == COPY_BATCH_MIN_BLOCK_BYTES
    if device.type == "cuda":
        small, large = small.pin_memory(), large.pin_memory()
        assert resolve_strategy("auto", small, device) is GatherStrategy.GPU_GATHER
        assert resolve_strategy("auto", large, device) is (
            GatherStrategy.COPY_BATCH
            if gather_cuda.copy_batch_available(large, device)
            else GatherStrategy.GPU_GATHER
        )


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
