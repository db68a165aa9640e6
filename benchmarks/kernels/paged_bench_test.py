"""pytest-benchmark entry points for the headline CPU-paged figures (CUDA only).

    PYTHONPATH=src python3 -m pytest benchmarks/kernels/paged_bench_test.py -p no:cacheprovider \
        --benchmark-json=OUT.json

Each benchmark synchronizes inside the timed function, so pytest-benchmark's wall clock is
the device time of the whole call; ``extra_info`` carries bytes, GB/s, the card and shape.
The full comparison matrix (strategies, overlap, chunk sizes) is ``paged_bench.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

MiB = 1 << 20


@pytest.fixture(scope="module")
def host() -> Iterator[Any]:
    from paged_bench import HostKV

    yield HostKV.allocate(512 * 1024 + 4096)


def _synced(fn: Callable[[], object]) -> Callable[[], None]:
    def run() -> None:
        fn()
        torch.cuda.synchronize()

    return run


def test_h2d_pinned_copy(benchmark: Any) -> None:
    size = 256 * MiB
    src = torch.empty(size, dtype=torch.uint8, pin_memory=True).random_(0, 256)
    dst = torch.empty(size, dtype=torch.uint8, device="cuda")
    run = _synced(lambda: dst.copy_(src, non_blocking=True))
    benchmark.pedantic(run, rounds=10, warmup_rounds=2)
    benchmark.extra_info.update(
        card=torch.cuda.get_device_name(),
        bytes=size,
        gbps=size / benchmark.stats.stats.median / 1e9,
    )


@pytest.mark.parametrize("ctx", [32 * 1024, 128 * 1024, 512 * 1024], ids=lambda c: f"{c // 1024}K")
@pytest.mark.parametrize("block", [256, 16])
def test_cpu_paged_decode(benchmark: Any, host: Any, ctx: int, block: int) -> None:
    import paged_bench as pb

    from servelab.kernels.paged import cpu_paged_attention
    from servelab.kernels.paged_cache import PagedKVCache
    from servelab.kernels.staging import StagingScratch, resolve_strategy

    cache = host.cache(block)
    table = pb.random_table(cache.num_blocks, ctx // block, 2)
    gen = torch.Generator().manual_seed(3)
    gpu = PagedKVCache.allocate(
        num_blocks=1,
        block_size=block,
        num_kv_heads=pb.HKV,
        head_size=pb.HEAD,
        dtype=pb.DTYPE,
        device="cuda",
    )
    gpu.key.copy_(torch.randn(gpu.key.shape, generator=gen).to(pb.DTYPE))
    gpu.value.copy_(torch.randn(gpu.value.shape, generator=gen).to(pb.DTYPE))
    query = torch.randn(1, pb.HKV * pb.GQA, pb.HEAD, generator=gen).to(pb.DTYPE).cuda()
    # A quarter of the context per chunk, 8K..32K tokens: big enough that staging a chunk
    # outlasts issuing its attention, small enough that the last chunk's attention is short.
    chunk = min(32768, max(8192, ctx // 4))
    scratch = StagingScratch.allocate(
        chunk_blocks=chunk // block,
        block_size=block,
        num_kv_heads=pb.HKV,
        head_size=pb.HEAD,
        dtype=pb.DTYPE,
        device="cuda",
    )
    run = _synced(
        lambda: cpu_paged_attention(
            query, cache, table, ctx, gpu, torch.tensor([0]), block, scratch=scratch
        )
    )
    benchmark.pedantic(run, rounds=5 if ctx >= 512 * 1024 else 10, warmup_rounds=2)
    nbytes = pb.kv_bytes(ctx)
    benchmark.extra_info.update(
        card=torch.cuda.get_device_name(),
        ctx=ctx,
        chunk_tokens=chunk,
        block=block,
        strategy=resolve_strategy("auto", cache.key, torch.device("cuda")).value,
        copy_rate_note="compare with test_h2d_pinned_copy of the same run",
        bytes=nbytes,
        q_heads=pb.HKV * pb.GQA,
        kv_heads=pb.HKV,
        head=pb.HEAD,
        dtype="bfloat16",
        effective_gbps=nbytes / benchmark.stats.stats.median / 1e9,
    )
