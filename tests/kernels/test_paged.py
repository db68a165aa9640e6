"""CPU-paged attention against the float64 reference, edge cases, and bad input.

Error rule: servelab.kernels.tolerance (docs/kernels-paged.md §1.5): max error within 2x the
error of the same reference run in the test dtype (+1e-5), mean within 1.5x, plus the fixed
backstops (bf16 atol 1e-3 rtol 1e-2, fp16 1e-3/1e-3, fp32 1e-5) and LSE atol 1e-3 (fp32
1e-5). The kernel keeps float32 partials, so on H100 measurements it sits ~10x below them.

Every run starts from poisoned memory: outputs, the staging scratch and unused cache blocks
hold NaN, so an unwritten element or a wrong block id shows up as NaN or a large error.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass

import pytest
import torch

from servelab.errors import KernelInputError
from servelab.kernels import gather_cuda
from servelab.kernels.attention import attend_range, chunk_fully_masked
from servelab.kernels.gather_cuda import IdRing
from servelab.kernels.paged import Chunk, check_plan, cpu_paged_attention, plan_chunks
from servelab.kernels.paged_cache import PagedKVCache, blocks_for
from servelab.kernels.reference import reference_attention
from servelab.kernels.staging import (
    GatherKernel,
    GatherStrategy,
    StagingScratch,
    gpu_gather_supported,
    triton_available,
)
from servelab.kernels.tolerance import check_attention

pytestmark = pytest.mark.kernels

NAN = float("nan")


@dataclass(frozen=True)
class Case:
    block: int
    gqa: int
    head: int
    num_q: int
    cpu_len: int
    gpu_len: int
    chunk: int
    dtype: torch.dtype = torch.bfloat16
    window: int | None = None
    softcap: float | None = None
    interleaved: bool = False
    strided_query: bool = False
    hkv: int = 2

    @property
    def id(self) -> str:
        parts = [
            f"bs{self.block}",
            f"g{self.gqa}",
            f"d{self.head}",
            f"q{self.num_q}",
            f"cpu{self.cpu_len}",
            f"suf{self.gpu_len}",
            f"ch{self.chunk}",
            str(self.dtype).removeprefix("torch."),
        ]
        if self.window:
            parts.append(f"win{self.window}")
        if self.softcap:
            parts.append(f"cap{self.softcap:g}")
        if self.interleaved:
            parts.append("kvinterleaved")
        if self.strided_query:
            parts.append("qstrided")
        return "-".join(parts)


# Curated default grid: small contexts (CPU CI on 2 cores), every axis touched at least once.
DEFAULT_CASES = (
    Case(16, 1, 64, 1, 300, 0, 64),  # decode, empty suffix, chunk divides nothing
    Case(16, 4, 128, 1, 333, 1, 80, interleaved=True),  # suffix 1, partial last block
    Case(32, 8, 64, 7, 320, 31, 96, torch.float16),  # suffix block-1, many queries
    Case(32, 3, 128, 5, 250, 32, 64, torch.float32, strided_query=True),  # odd GQA, suffix=block
    Case(256, 4, 64, 1, 600, 255, 256),  # lab block size, one-block chunks
    Case(256, 8, 256, 16, 512, 256, 512),  # head 256, chunk = whole host part
    Case(16, 4, 256, 33, 200, 16, 48, torch.float32),  # queries reach back into the host part
    Case(16, 4, 64, 4, 400, 20, 64, window=100),  # sliding window: early chunks skipped
    Case(32, 2, 128, 3, 300, 10, 128, torch.float16, softcap=30.0),
    Case(16, 1, 64, 3, 0, 40, 64),  # empty host part
    Case(32, 4, 64, 1, 512, 0, 512, torch.float32),  # chunk divides the context
)


def _full_cases() -> tuple[Case, ...]:
    """docs/kernels-paged.md §1.5: chunk 512/4096/5000 over 32,768 tokens, every axis crossed."""
    cases = []
    for chunk, gqa, head, block, num_q in itertools.product(
        (512, 4096, 5000), (1, 4, 8), (64, 128, 256), (16, 32, 256), (1, 16)
    ):
        for suffix in (0, 1, block - 1, block):
            cases.append(Case(block, gqa, head, num_q, 32768 - suffix, suffix, chunk))
    return tuple(cases)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "case" in metafunc.fixturenames:
        full = bool(metafunc.config.getoption("--kernels-full", default=False))
        cases = _full_cases() if full else DEFAULT_CASES
        metafunc.parametrize("case", cases, ids=[c.id for c in cases])


@dataclass(frozen=True)
class Scenario:
    query: torch.Tensor  # on the device
    key: torch.Tensor  # all tokens, host, [S, Hkv, D]
    value: torch.Tensor
    cpu_cache: PagedKVCache
    cpu_table: torch.Tensor
    gpu_cache: PagedKVCache
    gpu_table: torch.Tensor
    scratch: StagingScratch


def _poison(*tensors: torch.Tensor) -> None:
    for t in tensors:
        t.fill_(NAN)


def build(case: Case, device: torch.device, gen: torch.Generator, pinned: bool = True) -> Scenario:
    total = case.cpu_len + case.gpu_len
    hq = case.hkv * case.gqa
    key = torch.randn(total, case.hkv, case.head, generator=gen).to(case.dtype)
    value = torch.randn(total, case.hkv, case.head, generator=gen).to(case.dtype)
    if case.strided_query:
        # Every other head of a wider tensor: strides differ from a contiguous query.
        query = torch.randn(case.num_q, 2 * hq, case.head, generator=gen).to(case.dtype)
        query = query.to(device)[:, ::2]
        assert not query.is_contiguous()
    else:
        query = torch.randn(case.num_q, hq, case.head, generator=gen).to(case.dtype).to(device)
    ncb = blocks_for(case.cpu_len, case.block)
    ngb = blocks_for(case.gpu_len, case.block)
    pin = pinned and device.type != "cpu"
    cpu_cache = PagedKVCache.allocate(
        num_blocks=ncb + 3,
        block_size=case.block,
        num_kv_heads=case.hkv,
        head_size=case.head,
        dtype=case.dtype,
        device="cpu",
        pin_memory=pin,
        interleaved=case.interleaved,
    )
    gpu_cache = PagedKVCache.allocate(
        num_blocks=ngb + 2,
        block_size=case.block,
        num_kv_heads=case.hkv,
        head_size=case.head,
        dtype=case.dtype,
        device=device,
    )
    _poison(cpu_cache.key, cpu_cache.value, gpu_cache.key, gpu_cache.value)
    cpu_table = torch.randperm(ncb + 3, generator=gen)[:ncb].to(torch.int32)
    gpu_table = torch.randperm(ngb + 2, generator=gen)[:ngb]
    cpu_cache.write(cpu_table, key[: case.cpu_len], value[: case.cpu_len])
    gpu_cache.write(gpu_table, key[case.cpu_len :].to(device), value[case.cpu_len :].to(device))
    scratch = StagingScratch.allocate(
        chunk_blocks=max(1, case.chunk // case.block),
        block_size=case.block,
        num_kv_heads=case.hkv,
        head_size=case.head,
        dtype=case.dtype,
        device=device,
        with_pack=True,
    )
    _poison(scratch.key, scratch.value)
    return Scenario(query, key, value, cpu_cache, cpu_table, gpu_cache, gpu_table, scratch)


def run(
    sc: Scenario,
    case: Case,
    strategy: str | GatherStrategy = "auto",
    overlap: bool = True,
    step: str = "auto",
    gather_programs: int | None = None,
    gather_kernel: str | GatherKernel = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.full_like(sc.query, NAN, memory_format=torch.contiguous_format)
    lse = torch.full(sc.query.shape[:2], NAN, dtype=torch.float32, device=sc.query.device)
    res = cpu_paged_attention(
        sc.query,
        sc.cpu_cache,
        sc.cpu_table,
        case.cpu_len,
        sc.gpu_cache,
        sc.gpu_table,
        case.gpu_len,
        scratch=sc.scratch,
        chunk_tokens=case.chunk,
        window=case.window,
        softcap=case.softcap,
        strategy=strategy,
        overlap=overlap,
        step=step,
        gather_programs=gather_programs,
        gather_kernel=gather_kernel,
        out=out,
        out_lse=lse,
    )
    assert res[0] is out and res[1] is lse
    return out, lse


@pytest.mark.parametrize("step", ["auto", "torch"])
def test_matches_reference(
    case: Case, device: torch.device, torch_gen: torch.Generator, step: str
) -> None:
    """``auto`` is the Triton step on a GPU and the torch step on the CPU; ``torch`` is
    checked on its own only where the two differ."""
    if step == "torch" and device.type == "cpu":
        pytest.skip("on the CPU, auto already is the torch step")
    sc = build(case, device, torch_gen)
    q = sc.query.cpu()
    kw = {"causal": True, "window": case.window, "softcap": case.softcap}
    ref, ref_lse = reference_attention(q, sc.key, sc.value, **kw)  # type: ignore[arg-type]
    lowp, _ = reference_attention(q, sc.key, sc.value, upcast=False, **kw)  # type: ignore[arg-type]
    out, lse = run(sc, case, step=step)
    report = check_attention(out, ref, lowp, dtype=case.dtype, lse=lse, lse_ref=ref_lse)
    assert report.ok, report.explain()


def _strategies(device: torch.device, src: torch.Tensor) -> list[tuple[GatherStrategy, str]]:
    """Every strategy that runs here, ``gpu_gather`` once per gather kernel that runs."""
    found = [
        (s, "auto")
        for s in (GatherStrategy.PER_BLOCK, GatherStrategy.COALESCED, GatherStrategy.CPU_PACK)
    ]
    if gpu_gather_supported(src, device) and triton_available():
        found.append((GatherStrategy.GPU_GATHER, "triton"))
    if gather_cuda.available(src, device):
        found.append((GatherStrategy.GPU_GATHER, "cuda"))
    if gather_cuda.copy_batch_available(src, device):
        found.append((GatherStrategy.COPY_BATCH, "auto"))
    return found


@pytest.mark.parametrize("interleaved", [False, True])
def test_strategies_and_overlap_give_identical_results(
    device: torch.device, torch_gen: torch.Generator, interleaved: bool
) -> None:
    """Staging is a byte copy, so every strategy (and overlap on or off) must agree exactly."""
    case = Case(16, 4, 64, 2, 700, 9, 160, interleaved=interleaved)
    sc = build(case, device, torch_gen)
    want, want_lse = run(sc, case, GatherStrategy.PER_BLOCK, overlap=False)
    for strategy, kernel in _strategies(device, sc.cpu_cache.key):
        for overlap in (False, True):
            _poison(sc.scratch.key, sc.scratch.value)
            out, lse = run(sc, case, strategy, overlap, gather_kernel=kernel)
            assert torch.equal(out, want), (strategy, kernel, overlap)
            assert torch.equal(lse, want_lse), (strategy, kernel, overlap)


@pytest.mark.parametrize(
    ("strategy", "slots"), [("gpu_gather", 1), ("gpu_gather", 8), ("copy_batch", 8)]
)
def test_back_to_back_calls_with_changing_tables(
    device: torch.device, torch_gen: torch.Generator, strategy: str, slots: int
) -> None:
    """Calls issued without a sync between them, each with its own block table: a pinned id
    buffer rewritten before the launch that reads it had run would stage another call's
    blocks (the CUDA gather; one ring slot forces every call to wait for the previous one's
    staging), as would copy arrays the driver read after the next call rewrote them
    (copy_batch)."""
    case = Case(16, 4, 64, 1, 700, 9, 160)
    sc = build(case, device, torch_gen)
    if strategy == "gpu_gather" and not gather_cuda.available(sc.cpu_cache.key, device):
        pytest.skip("needs the CUDA gather: a CUDA device, nvcc and a pinned host cache")
    if strategy == "copy_batch" and not gather_cuda.copy_batch_available(sc.cpu_cache.key, device):
        pytest.skip("needs copy_batch: a CUDA device, nvcc, CUDA 12.8+ and a pinned host cache")
    sc = dataclasses.replace(sc, scratch=dataclasses.replace(sc.scratch, id_ring=IdRing(slots)))
    # Tables: the same blocks in other orders, with the cache rewritten to match, so that
    # every call attends the same tokens only if it staged its own table's blocks.
    nb = blocks_for(case.cpu_len, case.block)
    layouts = []
    for _ in range(6):
        perm = torch.randperm(sc.cpu_cache.num_blocks, generator=torch_gen)[:nb].to(torch.int32)
        cache = PagedKVCache.allocate(
            num_blocks=sc.cpu_cache.num_blocks, block_size=case.block, num_kv_heads=case.hkv,
            head_size=case.head, dtype=case.dtype, device="cpu", pin_memory=True,
        )  # fmt: skip
        _poison(cache.key, cache.value)
        cache.write(perm, sc.key[: case.cpu_len], sc.value[: case.cpu_len])
        layouts.append((cache, perm))
    want, want_lse = run(sc, case, gather_kernel="triton")
    outs = []
    for cache, perm in layouts:
        outs.append(run(dataclasses.replace(sc, cpu_cache=cache, cpu_table=perm), case, strategy))
    torch.cuda.synchronize()
    for i, (out, lse) in enumerate(outs):
        assert torch.equal(out, want) and torch.equal(lse, want_lse), i


def test_bad_values_raise_after_a_good_call(
    device: torch.device, torch_gen: torch.Generator
) -> None:
    """The checks a scratch remembers are the layout ones: lengths, block ids and scalars
    are still checked on every call, and a changed cache layout is checked again."""
    case = Case(16, 2, 64, 2, 100, 20, 64)
    sc = build(case, device, torch_gen)
    run(sc, case)  # fills scratch.checks
    bad_table = sc.cpu_table.clone()
    bad_table[1] = -1
    with pytest.raises(KernelInputError, match=r"cpu_block_table has block ids in \[-1"):
        run(dataclasses.replace(sc, cpu_table=bad_table), case)
    with pytest.raises(KernelInputError, match="cpu_block_table holds 2 block ids"):
        run(dataclasses.replace(sc, cpu_table=sc.cpu_table[:2]), case)
    with pytest.raises(KernelInputError, match="scratch too small for one chunk"):
        run(sc, dataclasses.replace(case, chunk=10 * case.chunk))
    with pytest.raises(KernelInputError, match="window must be None or an int >= 1"):
        run(sc, dataclasses.replace(case, window=0))
    # The same cache object, its tensors swapped in place for a non-dense view.
    wide = torch.zeros(8, 16, 2, 128, dtype=torch.bfloat16)
    sc.cpu_cache.key.set_(wide[..., ::2])  # type: ignore[call-overload]
    with pytest.raises(KernelInputError, match=r"cpu_cache\.key must be contiguous"):
        run(sc, case)


def test_pageable_host_cache(device: torch.device, torch_gen: torch.Generator) -> None:
    case = Case(32, 2, 64, 1, 400, 5, 128)
    pinned = build(case, device, torch_gen)
    pageable = build(
        case, device, torch.Generator().manual_seed(torch_gen.initial_seed()), pinned=False
    )
    a, la = run(pinned, case)
    b, lb = run(pageable, case)
    assert torch.equal(a, b) and torch.equal(la, lb)


def test_empty_host_part_is_suffix_exactly(
    device: torch.device, torch_gen: torch.Generator
) -> None:
    case = Case(16, 4, 64, 3, 0, 45, 64, torch.float32)
    sc = build(case, device, torch_gen)
    out, lse = run(sc, case, step="torch")  # bit-equal to the same step on the suffix alone
    k, v = sc.gpu_cache.read(sc.gpu_table, case.gpu_len)
    want, want_lse = attend_range(
        sc.query,
        k,
        v,
        scale=1 / math.sqrt(case.head),
        q_start=case.gpu_len - case.num_q,
        k_start=0,
        causal=True,
        window=None,
        softcap=None,
    )
    assert torch.equal(out, want.to(out.dtype)) and torch.equal(lse, want_lse)


def test_both_parts_empty(device: torch.device, torch_gen: torch.Generator) -> None:
    case = Case(16, 2, 64, 2, 0, 0, 64)
    sc = build(case, device, torch_gen)
    out, lse = run(sc, case)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.isneginf(lse).all() and not torch.isnan(lse).any()


def test_fully_masked_chunks_are_skipped_and_harmless(
    device: torch.device, torch_gen: torch.Generator
) -> None:
    # Window 40 at the end of a 512-token host part + 8-token suffix: chunks 0..6 of 64
    # tokens are invisible to every query. Their cache blocks hold NaN: attending them would
    # give NaN (0 x NaN in P.V), so an exact result shows they were never staged.
    case = Case(16, 2, 64, 2, 512, 8, 64, torch.float32, window=40)
    sc = build(case, device, torch_gen)
    for b in sc.cpu_table[: 448 // 16].tolist():
        sc.cpu_cache.key[b].fill_(NAN)
        sc.cpu_cache.value[b].fill_(NAN)
    out, lse = run(sc, case)
    q = sc.query.cpu()
    ref, ref_lse = reference_attention(q, sc.key, sc.value, causal=True, window=40)
    lowp, _ = reference_attention(q, sc.key, sc.value, causal=True, window=40, upcast=False)
    report = check_attention(out, ref, lowp, dtype=case.dtype, lse=lse, lse_ref=ref_lse)
    assert report.ok, report.explain()


def test_chunk_fully_masked_rule() -> None:
    kw = {"q_start": 100, "num_queries": 4}
    assert chunk_fully_masked(k_start=104, num_keys=10, causal=True, window=None, **kw)
    assert not chunk_fully_masked(k_start=103, num_keys=10, causal=True, window=None, **kw)
    # Window 10: query 100 sees 91..100; keys 80..90 are invisible to every query.
    assert chunk_fully_masked(k_start=80, num_keys=11, causal=True, window=10, **kw)
    assert not chunk_fully_masked(k_start=80, num_keys=12, causal=True, window=10, **kw)
    assert not chunk_fully_masked(k_start=104, num_keys=10, causal=False, window=None, **kw)
    assert chunk_fully_masked(k_start=0, num_keys=0, causal=False, window=None, **kw)


def test_plan_tiles_the_host_part_once() -> None:
    chunks = plan_chunks(1000, 32, 5)
    check_plan(chunks, 1000, 32)
    assert chunks[0] == Chunk(0, 5, 0, 160) and chunks[-1].token_end == 1000
    assert sum(c.token_end - c.token_start for c in chunks) == 1000
    doubled = (*chunks[:3], chunks[2], *chunks[3:])
    with pytest.raises(KernelInputError, match="overlaps the previous one"):
        check_plan(doubled, 1000, 32)
    with pytest.raises(KernelInputError, match="leaves a gap"):
        check_plan((chunks[0], *chunks[2:]), 1000, 32)
    with pytest.raises(KernelInputError, match="host part holds 1000"):
        check_plan(chunks[:-1], 1000, 32)


# --- bad input: a KernelInputError (a ValueError) naming the argument, nothing launched ---

BAD = [
    ("query_dims", "query must be 3-D"),
    ("query_dtype", "cpu_cache dtype torch.bfloat16 must equal the query dtype torch.float16"),
    ("heads", r"query heads \(6\) must be a multiple of cpu_cache KV heads \(4\)"),
    ("head_size", "cpu_cache head size 64 must equal the query head size 32"),
    ("cpu_cache_device", "cpu_cache must live in host memory"),
    ("table_range", r"cpu_block_table has block ids in \[-1, .*\] but the cache holds"),
    ("table_short", "cpu_block_table holds 2 block ids but the length needs"),
    ("table_dtype", "cpu_block_table must have dtype in"),
    ("table_device", "gpu_block_table must be a host"),
    ("scratch_small", "scratch too small for one chunk"),
    ("chunk_below_block", "smaller than one block"),
    ("scratch_shape", r"scratch blocks must be \[block_size, Hkv, D\]"),
    ("noncontig_cache", "cpu_cache.key must be contiguous in its last 3 dimensions"),
    ("out_shape", "out must have shape"),
    ("out_lse_dtype", "out_lse must have dtype in"),
    ("negative_len", "gpu_len must be >= 0"),
    ("window", "window must be None or an int >= 1"),
    ("step", "step must be one of auto, triton, torch; got 'fused'"),
    ("step_unsupported", "step='triton' needs a cuda or xpu query"),
]


@pytest.mark.parametrize(("what", "match"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_before_launch(
    device: torch.device, torch_gen: torch.Generator, what: str, match: str
) -> None:
    case = Case(16, 2, 64, 2, 100, 20, 64)
    sc = build(case, device, torch_gen)
    args: dict[str, object] = {
        "query": sc.query,
        "cpu_cache": sc.cpu_cache,
        "cpu_block_table": sc.cpu_table,
        "cpu_len": case.cpu_len,
        "gpu_cache": sc.gpu_cache,
        "gpu_block_table": sc.gpu_table,
        "gpu_len": case.gpu_len,
    }
    kw: dict[str, object] = {"scratch": sc.scratch, "chunk_tokens": case.chunk}
    out = torch.full_like(sc.query, NAN)
    kw["out"] = out
    if what == "query_dims":
        args["query"] = sc.query[0]
    elif what == "query_dtype":
        args["query"] = sc.query.half()
        kw["out"] = None
    elif what == "heads":
        cache = PagedKVCache.allocate(
            num_blocks=8,
            block_size=16,
            num_kv_heads=4,
            head_size=64,
            dtype=torch.bfloat16,
            device="cpu",
        )
        args["cpu_cache"] = cache
        args["query"] = torch.zeros(2, 6, 64, dtype=torch.bfloat16, device=device)
        kw["out"] = None
    elif what == "head_size":
        args["query"] = torch.zeros(2, 4, 32, dtype=torch.bfloat16, device=device)
        kw["out"] = None
    elif what == "cpu_cache_device":
        if device.type == "cpu":
            pytest.skip("host and device are the same here")
        args["cpu_cache"] = sc.gpu_cache
    elif what == "table_range":
        bad = sc.cpu_table.clone()
        bad[1] = -1
        args["cpu_block_table"] = bad
    elif what == "table_short":
        args["cpu_block_table"] = sc.cpu_table[:2]
    elif what == "table_dtype":
        args["cpu_block_table"] = sc.cpu_table.float()
    elif what == "table_device":
        if device.type == "cpu":
            pytest.skip("no second device")
        args["gpu_block_table"] = sc.gpu_table.to(device)
    elif what == "scratch_small":
        kw["chunk_tokens"] = 10 * case.chunk
    elif what == "chunk_below_block":
        kw["chunk_tokens"] = 8
    elif what == "scratch_shape":
        kw["scratch"] = StagingScratch.allocate(
            chunk_blocks=4,
            block_size=32,
            num_kv_heads=2,
            head_size=64,
            dtype=torch.bfloat16,
            device=device,
        )
        kw["chunk_tokens"] = None
    elif what == "noncontig_cache":
        wide = torch.zeros(8, 16, 2, 128, dtype=torch.bfloat16)
        args["cpu_cache"] = PagedKVCache(key=wide[..., ::2], value=wide[..., ::2])
    elif what == "out_shape":
        kw["out"] = torch.full((2, 4, 63), NAN, dtype=sc.query.dtype, device=device)
    elif what == "out_lse_dtype":
        kw["out_lse"] = torch.zeros(2, 4, dtype=torch.float16, device=device)
    elif what == "negative_len":
        args["gpu_len"] = -1
    elif what == "window":
        kw["window"] = 0
    elif what == "step":
        kw["step"] = "fused"
    elif what == "step_unsupported":
        if device.type != "cpu":
            pytest.skip("the Triton step serves this case on a GPU")
        kw["step"] = "triton"
    with pytest.raises(KernelInputError, match=match) as info:
        cpu_paged_attention(**args, **kw)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)
    assert torch.isnan(out).all(), "nothing may be written before validation passes"
    assert torch.isnan(sc.scratch.key).all(), "nothing may be staged before validation passes"


# --- the per-chunk step: both product layouts, the split P·V, the float32 products ---


@pytest.mark.parametrize(
    ("dtype", "hkv", "gqa", "num_q", "num_k", "window", "softcap"),
    [
        (torch.bfloat16, 8, 8, 1, 2048 + 300, None, None),  # decode shape, split P·V + tail
        (torch.bfloat16, 2, 4, 3, 4096, None, None),  # split P·V, no tail, causal rows
        (torch.float16, 4, 2, 5, 700, 200, 20.0),  # window + soft-cap, fully masked rows
        (torch.float32, 2, 3, 7, 2100, None, None),
    ],
)
@pytest.mark.parametrize("block_diagonal", [True, False])
def test_step_layouts_match_reference(
    device: torch.device,
    torch_gen: torch.Generator,
    dtype: torch.dtype,
    hkv: int,
    gqa: int,
    num_q: int,
    num_k: int,
    window: int | None,
    softcap: float | None,
    block_diagonal: bool,
) -> None:
    """The block-diagonal and per-head layouts each pass the error rule on their own."""
    head = 64
    q = torch.randn(num_q, hkv * gqa, head, generator=torch_gen).to(dtype)
    k = torch.randn(num_k, hkv, head, generator=torch_gen).to(dtype)
    v = torch.randn(num_k, hkv, head, generator=torch_gen).to(dtype)
    # Queries start 10 tokens before the last key: the last rows see a prefix only, and
    # with the window some early rows see nothing at all before the causal edge moves.
    q_start = num_k - num_q - 10
    kw = {"causal": True, "window": window, "softcap": softcap}
    ref, ref_lse = reference_attention(q, k, v, q_start=q_start, **kw)  # type: ignore[arg-type]
    lowp, _ = reference_attention(q, k, v, q_start=q_start, upcast=False, **kw)  # type: ignore[arg-type]
    out, lse = attend_range(
        q.to(device),
        k.to(device),
        v.to(device),
        scale=1 / math.sqrt(head),
        q_start=q_start,
        k_start=0,
        block_diagonal=block_diagonal,
        **kw,  # type: ignore[arg-type]
    )
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    report = check_attention(out, ref, lowp, dtype=dtype, lse=lse, lse_ref=ref_lse)
    assert report.ok, report.explain()


def test_step_layouts_on_empty_and_single_key_rows(
    device: torch.device, torch_gen: torch.Generator
) -> None:
    """Window 40, keys 0..61, queries at 100 and 101: query 100 sees key 61 alone (its output
    is that value exactly), query 101 sees nothing (output 0, LSE -inf, never NaN)."""
    q = torch.randn(2, 4, 32, generator=torch_gen).to(torch.bfloat16).to(device)
    k = torch.randn(62, 2, 32, generator=torch_gen).to(torch.bfloat16).to(device)
    v = torch.randn(62, 2, 32, generator=torch_gen).to(torch.bfloat16).to(device)
    for block_diagonal in (True, False):
        out, lse = attend_range(
            q,
            k,
            v,
            scale=0.1,
            q_start=100,
            k_start=0,
            causal=True,
            window=40,
            softcap=None,
            block_diagonal=block_diagonal,
        )
        want = v[61].float().repeat_interleave(2, dim=0)  # query head h reads KV head h // 2
        assert torch.equal(out[0], want), block_diagonal
        assert torch.isfinite(lse[0]).all(), block_diagonal
        assert torch.equal(out[1], torch.zeros_like(out[1])), block_diagonal
        assert torch.isneginf(lse[1]).all(), block_diagonal


def test_matmul_f32_accumulates_in_float32(
    device: torch.device, torch_gen: torch.Generator
) -> None:
    """bf16 operands, float32 result: as exact as upcasting first (products of bf16 numbers
    are exact in float32), far closer than a bf16 result (~4e-3 relative)."""
    from servelab.kernels.attention import matmul_f32

    a = torch.randn(3, 16, 256, generator=torch_gen).to(torch.bfloat16)
    b = torch.randn(3, 256, 40, generator=torch_gen).to(torch.bfloat16)
    want = torch.bmm(a.double(), b.double())
    for got in (
        matmul_f32(a.to(device), b.to(device)),
        matmul_f32(a[0].to(device), b[0].to(device)).unsqueeze(0),
    ):
        assert got.dtype == torch.float32
        rel = float((got.cpu().double() - want[: got.shape[0]]).abs().max() / want.abs().max())
        assert rel < 1e-5, rel


def test_gather_programs_is_validated_and_does_not_change_results(
    device: torch.device, torch_gen: torch.Generator
) -> None:
    case = Case(16, 4, 64, 1, 700, 9, 160)
    sc = build(case, device, torch_gen)
    with pytest.raises(KernelInputError, match="gather_programs"):
        run(sc, case, gather_programs=0)
    want, want_lse = run(sc, case)
    for programs in (1, 7, 1 << 20):
        _poison(sc.scratch.key, sc.scratch.value)
        out, lse = run(sc, case, gather_programs=programs)
        assert torch.equal(out, want) and torch.equal(lse, want_lse), programs
