"""The copy/compute pipeline of ``cpu_paged_attention``: host chunks staged into the
scratch's slots on a copy stream while the previous chunk is attended on the compute stream.

Two (or more) scratch slots, events between the streams: a slot is restaged only after the
attention that read it, and a chunk is attended only after its copy. Copies run ahead of the
attention by up to ``buffers - 1`` chunks. On a CPU device there are no streams and the same
code runs in order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from servelab.kernels.paged_cache import PagedKVCache
from servelab.kernels.paged_checks import Checked
from servelab.kernels.paged_plan import CallPlan
from servelab.kernels.paged_steps import Step
from servelab.kernels.staging import GatherKernel, GatherStrategy, StagingScratch, stage_blocks

# One copy stream per device, kept across calls (creating one costs host time).
_COPY_STREAMS: dict[tuple[str, int], Any] = {}


def _copy_stream(mod: Any, device: torch.device) -> Any:
    index = device.index if device.index is not None else mod.current_device()
    key = (device.type, int(index))
    if key not in _COPY_STREAMS:
        _COPY_STREAMS[key] = mod.Stream(device)
    return _COPY_STREAMS[key]


class Streams:
    """Copy and compute streams for one call; no-ops on a CPU device."""

    def __init__(self, device: torch.device, overlap: bool) -> None:
        self._mod: Any = getattr(torch, device.type) if device.type in ("cuda", "xpu") else None
        self.compute: Any = None
        self.copy: Any = None
        if self._mod is not None:
            self.compute = self._mod.current_stream(device)
            self.copy = _copy_stream(self._mod, device) if overlap else self.compute

    @contextlib.contextmanager
    def on_copy(self) -> Iterator[None]:
        if self._mod is None or self.copy is self.compute:
            yield
            return
        with self._mod.stream(self.copy):
            yield

    def record(self, stream: Any) -> Any:
        return None if stream is None else stream.record_event()

    def wait(self, stream: Any, event: Any) -> None:
        if stream is not None and event is not None:
            stream.wait_event(event)

    def copy_waits_compute(self) -> None:
        if self.copy is not None and self.copy is not self.compute:
            self.copy.wait_stream(self.compute)


@dataclass(frozen=True)
class Staging:
    """How the host part is staged: the caches, the table, the scratch, and what the checks
    resolved (strategy, gather kernel) plus the caller's tuning."""

    cpu_cache: PagedKVCache
    cpu_block_table: torch.Tensor
    scratch: StagingScratch
    checked: Checked
    overlap: bool
    gather_programs: int | None


def run(
    plan: CallPlan,
    staging: Staging,
    device: torch.device,
    make_step: Callable[[], Step],
    attend_suffix: Callable[[Step], None],
) -> Step:
    """Stage and attend every chunk of ``plan``; return the step holding every partial.

    ``make_step`` is called after the first copy is issued (its set-up is host time the
    link need not wait for); ``attend_suffix`` attends the device suffix right after, where
    it overlaps the first copy.
    """
    chunks, scratch, cache = plan.chunks, staging.scratch, staging.cpu_cache
    resolved, kernel = staging.checked.strategy, staging.checked.kernel
    streams = Streams(device, staging.overlap)
    buffers = scratch.buffers
    slot_free: list[Any] = [None] * buffers
    pack_done: list[Any] = [None] * buffers
    staged: list[Any] = [None] * len(chunks)
    pack = resolved is GatherStrategy.CPU_PACK and device.type != "cpu"
    cuda_gather = resolved is GatherStrategy.GPU_GATHER and kernel is GatherKernel.CUDA
    # Both ways through the C library take the copy stream's handle: no switch of torch's
    # current stream.
    raw_stream = cuda_gather or resolved is GatherStrategy.COPY_BATCH
    ids_host = ids_dev = None
    ring_slot = 0
    if chunks and cuda_gather:
        # The kernel reads the ids from a pinned buffer when it runs: no device copy, and a
        # ring buffer no pending launch still reads (its guard: the last staging event).
        n_ids = chunks[-1].block_end
        ring_slot, ring_buf = scratch.id_ring.acquire(n_ids)
        ids_host = ring_buf[:n_ids]
        ids_host.copy_(staging.cpu_block_table[:n_ids])
    elif chunks:
        # copy_batch reads the ids on the host during each call: any contiguous int64 tensor.
        ids_host = staging.cpu_block_table[: chunks[-1].block_end].to(torch.int64).contiguous()
        if resolved is GatherStrategy.GPU_GATHER:
            ids_dev = ids_host.to(device)
    if chunks:
        streams.copy_waits_compute()

    def stage(j: int) -> None:
        c, slot = chunks[j], j % buffers
        assert ids_host is not None  # narrowing: only called when there are chunks
        with contextlib.nullcontext() if raw_stream else streams.on_copy():
            streams.wait(streams.copy, slot_free[slot])
            if pack and pack_done[slot] is not None:
                pack_done[slot].synchronize()  # the host rewrites this pack slot next
            stage_blocks(
                cache.key,
                cache.value,
                ids_host[c.block_start : c.block_end],
                scratch.key[slot],
                scratch.value[slot],
                strategy=resolved,
                device_ids=None if ids_dev is None else ids_dev[c.block_start : c.block_end],
                pack_key=None if scratch.pack_key is None else scratch.pack_key[slot],
                pack_value=None if scratch.pack_value is None else scratch.pack_value[slot],
                programs=staging.gather_programs,
                kernel=GatherKernel.CUDA if cuda_gather else GatherKernel.TRITON,
                stream=streams.copy,
            )
            staged[j] = streams.record(streams.copy)
        if cuda_gather:
            scratch.id_ring.guard(ring_slot, staged[j])
        if pack:
            pack_done[slot] = staged[j]

    # Copies run ahead of the attention by up to buffers - 1 chunks, so the copy stream
    # already holds the next chunk while the host issues this chunk's attention.
    issued = 0
    while issued < min(len(chunks), max(1, buffers - 1)):
        stage(issued)
        issued += 1
    # Set-up the first copy does not need comes after it: its launch is what the link waits
    # for (with one 32K-token chunk the call is the copy plus this host time).
    step = make_step()
    if plan.suffix_visible:  # the suffix needs no staging and overlaps the first copy
        attend_suffix(step)
    bs, h, d = cache.block_size, cache.num_kv_heads, cache.head_size
    for i, c in enumerate(chunks):
        while issued < min(len(chunks), i + buffers):
            stage(issued)
            issued += 1
        slot = i % buffers
        nb, ntok = c.block_end - c.block_start, c.token_end - c.token_start
        streams.wait(streams.compute, staged[i])
        k = scratch.key[slot, :nb].reshape(nb * bs, h, d)[:ntok]
        v = scratch.value[slot, :nb].reshape(nb * bs, h, d)[:ntok]
        step.attend(k, v, c.token_start)
        slot_free[slot] = streams.record(streams.compute)
    if pack:
        # The next call may rewrite the pack buffers as soon as this one returns.
        for ev in pack_done:
            if ev is not None:
                ev.synchronize()
    return step
