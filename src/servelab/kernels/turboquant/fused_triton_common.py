"""What both Triton split-KV decode backends of this package share: the program's place on
the grid (:func:`split_program`) and the device's multiprocessor count the split count is
sized by (:func:`sm_count`)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).multi_processor_count)
    props = torch.xpu.get_device_properties(device)
    return int(getattr(props, "gpu_subslice_count", 0) or getattr(props, "max_compute_units", 64))


@triton.jit  # type: ignore[untyped-decorator]
def split_program(  # type: ignore[no-untyped-def]
    SEQ_LENS, split_len, GROUP: tl.constexpr, G_PAD: tl.constexpr
):
    """This program's KV head, split and sequence on the (Hkv, splits, B) grid; the number
    of query heads; its token range [start, end); its query heads (padded to G_PAD rows)
    and their mask."""
    pid_h = tl.program_id(0)  # fastest: programs of one token range share metadata sectors
    pid_s = tl.program_id(1)
    pid_b = tl.program_id(2)
    hq = tl.num_programs(0) * GROUP
    seq_len = tl.load(SEQ_LENS + pid_b)
    start = pid_s * split_len
    end = tl.minimum(start + split_len, seq_len)
    offs_g = tl.arange(0, G_PAD)
    return pid_h, pid_s, pid_b, hq, start, end, pid_h * GROUP + offs_g, offs_g < GROUP
