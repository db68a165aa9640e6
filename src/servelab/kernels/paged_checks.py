"""The argument checks of ``cpu_paged_attention``, run before anything is launched.

The call's arguments come in two groups: :class:`CallArgs` (what is computed: tensors,
lengths, mask scalars) and :class:`PagedOptions` (how it runs: staging strategy, overlap,
gather kernel and grid, chunk step). Both are checked here.

A call's layout checks (shapes, dtypes, devices, contiguity, pinnedness, the chunk step, the
staging strategy and gather kernel they resolve to) are remembered per scratch
(``scratch.checks``, a :class:`~servelab.kernels.validation.CheckMemo` keyed by tensor identity
and layout); lengths, block ids, chunk size and scalars are checked on every call, in the same
order as a first call, so a bad call raises the same ``KernelInputError`` before any launch.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from servelab.errors import KernelInputError
from servelab.kernels import gather_cuda, paged_step_triton
from servelab.kernels.paged_cache import PagedKVCache, blocks_for
from servelab.kernels.staging import (
    GatherKernel,
    GatherStrategy,
    StagingScratch,
    resolve_gather_kernel,
    resolve_strategy,
)
from servelab.kernels.validation import (
    KV_DTYPES,
    check_block_ids,
    describe,
    require_device,
    require_dtype,
    require_int,
    require_ndim,
    require_optional_positive,
    require_shape,
)

STEPS = ("auto", "triton", "torch")


def resolve_step(step: str, query: torch.Tensor, kv_dtype: torch.dtype) -> bool:
    """Whether this call uses the Triton step; raises on an unknown or impossible choice."""
    if step not in STEPS:
        raise KernelInputError(f"step must be one of {', '.join(STEPS)}; got {step!r}")
    if step == "torch":
        return False
    ok = paged_step_triton.supported(query, kv_dtype)
    if step == "triton" and not ok:
        raise KernelInputError(
            "step='triton' needs a cuda or xpu query, a float16/bfloat16/float32 cache of "
            f"the query's dtype and a power-of-two head size >= 16; got {describe(query)}"
        )
    return ok


@dataclass(frozen=True)
class CallArgs:
    """The arguments of one call that the checks look at."""

    query: torch.Tensor
    cpu_cache: PagedKVCache
    cpu_block_table: torch.Tensor
    cpu_len: int
    gpu_cache: PagedKVCache
    gpu_block_table: torch.Tensor
    gpu_len: int
    scratch: StagingScratch
    chunk_tokens: int | None
    scale: float | None
    window: int | None
    softcap: float | None
    out: torch.Tensor | None
    out_lse: torch.Tensor | None


@dataclass(frozen=True)
class PagedOptions:
    """How one call runs; none of these changes the result beyond rounding."""

    strategy: str | GatherStrategy = "auto"
    overlap: bool = True
    gather_programs: int | None = None
    gather_kernel: str | GatherKernel = "auto"
    step: str = "auto"


@dataclass(frozen=True)
class Checked:
    """What the layout checks resolved: the chunk step, the strategy, the gather kernel."""

    use_triton: bool
    strategy: GatherStrategy
    kernel: GatherKernel | None


def _shape_of(t: torch.Tensor | None) -> tuple[object, ...] | None:
    return None if t is None else (t.shape, t.dtype, t.device)


def _memo_key(
    a: CallArgs, strategy: object, gather_kernel: object, step: object
) -> tuple[tuple[torch.Tensor, ...], tuple[object, ...]] | None:
    """The tensors and extras that the layout checks depend on; None if a check must run
    anyway (an argument of the wrong type, which the full checks name)."""
    if not (
        all(isinstance(x, str | enum.Enum) for x in (strategy, gather_kernel, step))
        and all(t is None or isinstance(t, torch.Tensor) for t in (a.out, a.out_lse))
        and isinstance(a.query, torch.Tensor)
        and isinstance(a.cpu_cache, PagedKVCache)
        and isinstance(a.gpu_cache, PagedKVCache)
        and isinstance(a.scratch, StagingScratch)
        and all(
            isinstance(t, torch.Tensor)
            for t in (a.cpu_cache.key, a.cpu_cache.value, a.gpu_cache.key, a.gpu_cache.value)
        )
    ):
        return None
    sc = a.scratch
    tensors = (
        a.cpu_cache.key, a.cpu_cache.value, a.gpu_cache.key, a.gpu_cache.value, sc.key, sc.value,
        *(p for p in (sc.pack_key, sc.pack_value) if p is not None),
    )  # fmt: skip
    extra = (_shape_of(a.query), _shape_of(a.out), _shape_of(a.out_lse), strategy,
             gather_kernel, step)  # fmt: skip
    return tensors, extra


def check_call(a: CallArgs, options: PagedOptions) -> tuple[int, Checked]:
    """Every check of the call, before anything is launched; the layout checks only the first
    time these caches, scratch and query shape come together. Returns the chunk size in
    blocks and what the layout checks resolved."""
    chunk_blocks, checked = _check_call(a, options.strategy, options.gather_kernel, options.step)
    if options.gather_programs is not None:
        require_int("gather_programs", options.gather_programs, minimum=1)
    return chunk_blocks, checked


def _check_call(
    a: CallArgs, strategy: str | GatherStrategy, gather_kernel: str | GatherKernel, step: str
) -> tuple[int, Checked]:
    key = _memo_key(a, strategy, gather_kernel, step)
    memo = a.scratch.checks if key is not None else None
    if key is not None and memo is not None:
        hit = memo.get(*key)
        if isinstance(hit, Checked):
            # Same order as _validate, minus what cannot have changed: the first failing
            # check is the one the full validation would have named.
            _check_lengths_and_tables(a)
            return _chunk_blocks_and_scalars(a), hit
    chunk_blocks = validate(a)
    use_triton = resolve_step(step, a.query, a.cpu_cache.dtype)
    device = a.query.device
    resolved = resolve_strategy(strategy, a.cpu_cache.key, device)
    kernel = None
    if resolved is GatherStrategy.GPU_GATHER:
        kernel = resolve_gather_kernel(gather_kernel, a.cpu_cache.key, device)
        if kernel is GatherKernel.CUDA:
            gather_cuda.launcher(device)  # nvcc runs here, if at all: before any launch
    checked = Checked(use_triton, resolved, kernel)
    if key is not None and memo is not None:
        memo.put(*key, checked)
    return chunk_blocks, checked


def _check_lengths_and_tables(a: CallArgs) -> None:
    require_int("cpu_len", a.cpu_len)
    require_int("gpu_len", a.gpu_len)
    for name, table, cache, length in (
        ("cpu_block_table", a.cpu_block_table, a.cpu_cache, a.cpu_len),
        ("gpu_block_table", a.gpu_block_table, a.gpu_cache, a.gpu_len),
    ):
        check_block_ids(name, table, cache.num_blocks, blocks_for(length, cache.block_size))


def _chunk_blocks_and_scalars(a: CallArgs) -> int:
    scratch, chunk_tokens, block_size = a.scratch, a.chunk_tokens, a.cpu_cache.block_size
    chunk_blocks = scratch.chunk_blocks
    if chunk_tokens is not None:
        require_int("chunk_tokens", chunk_tokens, minimum=1)
        wanted = chunk_tokens // block_size
        if wanted < 1:
            raise KernelInputError(
                f"chunk_tokens={chunk_tokens} is smaller than one block "
                f"({block_size} tokens); chunks are whole blocks"
            )
        if wanted > scratch.chunk_blocks:
            raise KernelInputError(
                f"scratch too small for one chunk: chunk_tokens={chunk_tokens} needs "
                f"{wanted} blocks per slot but the scratch holds {scratch.chunk_blocks} "
                f"({scratch.chunk_tokens} tokens); allocate a larger scratch or pass a "
                "smaller chunk_tokens"
            )
        chunk_blocks = wanted
    require_optional_positive("scale", a.scale)
    require_optional_positive("softcap", a.softcap)
    window = a.window
    if window is not None and (
        isinstance(window, bool) or not isinstance(window, int) or window < 1
    ):
        raise KernelInputError(f"window must be None or an int >= 1, got {window!r}")
    return chunk_blocks


def validate(a: CallArgs) -> int:
    """Check every argument on the host; return the chunk size in blocks."""
    query, cpu_cache, gpu_cache, scratch = a.query, a.cpu_cache, a.gpu_cache, a.scratch
    out, out_lse = a.out, a.out_lse
    if not isinstance(query, torch.Tensor):
        raise KernelInputError("query must be a torch.Tensor [T, Hq, D]")
    require_ndim("query", query, 3, "[T, Hq, D]")
    require_dtype("query", query, KV_DTYPES)
    num_q, num_heads, head_size = query.shape
    if num_q < 1:
        raise KernelInputError(f"query must hold at least one token; got {describe(query)}")
    device = query.device
    for name, cache in (("cpu_cache", cpu_cache), ("gpu_cache", gpu_cache)):
        if not isinstance(cache, PagedKVCache):
            raise KernelInputError(f"{name} must be a PagedKVCache, got {type(cache).__name__}")
        cache.validate(name)
        if cache.dtype != query.dtype:
            raise KernelInputError(
                f"{name} dtype {cache.dtype} must equal the query dtype {query.dtype}"
            )
        if cache.head_size != head_size:
            raise KernelInputError(
                f"{name} head size {cache.head_size} must equal the query head size {head_size}"
            )
        if num_heads % cache.num_kv_heads != 0:
            raise KernelInputError(
                f"query heads ({num_heads}) must be a multiple of {name} KV heads "
                f"({cache.num_kv_heads})"
            )
    if cpu_cache.device.type != "cpu":
        raise KernelInputError(
            f"cpu_cache must live in host memory (device cpu); got {cpu_cache.device}"
        )
    require_device("gpu_cache.key", gpu_cache.key, device, "the query's device")
    if gpu_cache.num_kv_heads != cpu_cache.num_kv_heads:
        raise KernelInputError(
            f"gpu_cache KV heads ({gpu_cache.num_kv_heads}) must equal cpu_cache KV heads "
            f"({cpu_cache.num_kv_heads})"
        )
    _check_lengths_and_tables(a)
    if not isinstance(scratch, StagingScratch):
        raise KernelInputError(
            f"scratch must be a StagingScratch (StagingScratch.allocate), got "
            f"{type(scratch).__name__}"
        )
    scratch.validate()
    require_device("scratch.key", scratch.key, device, "the query's device")
    expected = (cpu_cache.block_size, cpu_cache.num_kv_heads, cpu_cache.head_size)
    if tuple(scratch.key.shape[2:]) != expected or scratch.key.dtype != cpu_cache.dtype:
        raise KernelInputError(
            f"scratch blocks must be [block_size, Hkv, D] = {expected} of dtype "
            f"{cpu_cache.dtype} like cpu_cache; got {describe(scratch.key)}"
        )
    chunk_blocks = _chunk_blocks_and_scalars(a)
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise KernelInputError("out must be a torch.Tensor")
        require_shape("out", out, tuple(query.shape), "(the query's shape [T, Hq, D])")
        if out.dtype != query.dtype:
            raise KernelInputError(f"out must have the query dtype {query.dtype}; got {out.dtype}")
        require_device("out", out, device, "the query's device")
    if out_lse is not None:
        if not isinstance(out_lse, torch.Tensor):
            raise KernelInputError("out_lse must be a torch.Tensor")
        require_shape("out_lse", out_lse, (num_q, num_heads), "[T, Hq]")
        require_dtype("out_lse", out_lse, (torch.float32,))
        require_device("out_lse", out_lse, device, "the query's device")
    return chunk_blocks
