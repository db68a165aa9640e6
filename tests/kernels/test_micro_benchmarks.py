"""Kernel micro-benchmarks that run on any machine, the CPU included (pytest-benchmark).

Small shapes, a fixed number of rounds: a few seconds in all, so they run with every
``pytest -m kernels`` and ``pytest -m "not slow"``. Each one puts the kernel's labels in
``extra_info`` (kernel, device, dtype, query tokens, query and KV heads, head size, context
tokens, and the kernel's own axes: block and chunk size, step, preset), so a
``--benchmark-json`` file says what every time is a time of::

    pytest -m kernels tests/kernels/test_micro_benchmarks.py --benchmark-json=out.json

They are micro-benchmarks of the library's code paths on this machine, not the GPU figures of
BENCHMARKS.md (``benchmarks/kernels/``). Without them, ``pytest -m kernels --benchmark-json``
on a machine without CUDA ran no benchmark and pytest-benchmark's "Not saving anything"
warning, an error under ``filterwarnings = error``, failed the session.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from servelab.kernels import (
    PagedKVCache,
    StagingScratch,
    cpu_paged_attention,
    merge_states,
    reference_attention,
)
from servelab.kernels.staging import resolve_strategy
from servelab.kernels.turboquant import KVCodec, unfused_decode_attention

pytestmark = pytest.mark.kernels

ROUNDS = 5  # fixed, not calibrated: the default run stays a few seconds long
DEVICE = torch.device("cpu")  # the point is a figure on any machine, the same one everywhere


def _run(benchmark: Any, fn: Callable[[], object], labels: dict[str, object]) -> None:
    benchmark.pedantic(fn, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(
        {"device": DEVICE.type, "torch": torch.__version__.split("+")[0], **labels}
    )


def _randn(gen: torch.Generator, *shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(dtype)


def test_reference_attention(benchmark: Any) -> None:
    """The float64 reference: decode, 8 query / 2 KV heads, d 64, 2,048 keys."""
    t, hq, hkv, d, s = 1, 8, 2, 64, 2048
    gen = torch.Generator().manual_seed(0)
    q, k, v = (_randn(gen, n, h, d, dtype=torch.float32) for n, h in ((t, hq), (s, hkv), (s, hkv)))
    _run(
        benchmark,
        lambda: reference_attention(q, k, v, causal=True),
        {"kernel": "reference_attention", "dtype": "float32 in, float64 compute",
         "num_q": t, "q_heads": hq, "kv_heads": hkv, "head_size": d, "context": s},
    )  # fmt: skip


def test_merge_states(benchmark: Any) -> None:
    """The LSE merge of two partial states: 64 query tokens, 8 heads, d 128."""
    t, h, d = 64, 8, 128
    gen = torch.Generator().manual_seed(1)
    oa, ob = _randn(gen, t, h, d, dtype=torch.float32), _randn(gen, t, h, d, dtype=torch.float32)
    la, lb = _randn(gen, t, h, dtype=torch.float32), _randn(gen, t, h, dtype=torch.float32)
    _run(
        benchmark,
        lambda: merge_states(oa, la, ob, lb),
        {"kernel": "merge_states", "dtype": "float32", "num_q": t, "q_heads": h,
         "head_size": d, "partials": 2},
    )  # fmt: skip


def test_cpu_paged_attention(benchmark: Any) -> None:
    """The whole CPU-paged call on the CPU (torch step): decode over 2,048 host tokens in
    16-token blocks behind a random table, 512-token chunks, a one-block device suffix."""
    t, hq, hkv, d, ctx, block, chunk = 1, 8, 2, 64, 2048, 16, 512
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(2)
    n_host, n_dev = ctx // block, 1
    caches = []
    for blocks in (n_host + 3, n_dev + 1):
        cache = PagedKVCache.allocate(
            num_blocks=blocks, block_size=block, num_kv_heads=hkv, head_size=d, dtype=dtype,
            device=DEVICE,
        )  # fmt: skip
        cache.key.copy_(_randn(gen, *cache.key.shape, dtype=dtype))
        cache.value.copy_(_randn(gen, *cache.value.shape, dtype=dtype))
        caches.append(cache)
    host, dev = caches
    host_table = torch.randperm(n_host + 3, generator=gen)[:n_host].to(torch.int32)
    dev_table = torch.tensor([1], dtype=torch.int32)
    scratch = StagingScratch.allocate(
        chunk_blocks=chunk // block, block_size=block, num_kv_heads=hkv, head_size=d,
        dtype=dtype, device=DEVICE,
    )  # fmt: skip
    query = _randn(gen, t, hq, d, dtype=dtype)

    def call() -> object:
        return cpu_paged_attention(
            query, host, host_table, ctx, dev, dev_table, block, scratch=scratch,
            chunk_tokens=chunk,
        )  # fmt: skip

    _run(
        benchmark,
        call,
        {"kernel": "cpu_paged_attention", "dtype": "bfloat16", "num_q": t, "q_heads": hq,
         "kv_heads": hkv, "head_size": d, "context": ctx + block, "host_tokens": ctx,
         "device_tokens": block, "block_size": block, "chunk_tokens": chunk,
         "table": "random", "step": "torch",
         "strategy": resolve_strategy("auto", host.key, DEVICE).value},
    )  # fmt: skip


@pytest.mark.parametrize("what", ["encode", "unfused_decode"])
def test_turboquant(benchmark: Any, what: str) -> None:
    """TurboQuant's 4-bit preset: encoding K/V, and decode attention over the dequantized
    cache (the fused kernels' oracle; the fused kernels need a GPU)."""
    preset, b, hq, hkv, d, tokens = "turboquant_4bit_nc", 1, 8, 2, 128, 1024
    gen = torch.Generator().manual_seed(3)
    k, v = (_randn(gen, b, hkv, tokens, d, dtype=torch.float16) for _ in range(2))
    q = _randn(gen, b, hq, d, dtype=torch.float16)
    codec = KVCodec.build(preset, d, "randomized_hadamard", seed=1)
    cache = codec.encode(k, v)
    fn: Callable[[], object]
    if what == "encode":
        fn = lambda: codec.encode(k, v)  # noqa: E731
    else:
        fn = lambda: unfused_decode_attention(q, cache, codec)  # noqa: E731
    _run(
        benchmark,
        fn,
        {"kernel": f"turboquant.{what}", "preset": preset, "dtype": "float16", "batch": b,
         "num_q": 1, "q_heads": hq, "kv_heads": hkv, "head_size": d, "context": tokens},
    )  # fmt: skip
