"""Host-side checks of a fused TurboQuant decode call, run before the first launch: device,
head size, output buffer, sequence lengths and the launch configuration. Every failure is a
:class:`~servelab.errors.KernelInputError` that names the entry point (``where``)."""

from __future__ import annotations

import torch

from servelab.errors import KernelInputError
from servelab.kernels.turboquant.fused_config import BACKENDS, LaunchConfig
from servelab.kernels.turboquant.fused_words_cuda import WARPS as CUDA_WARPS

SUPPORTED_DEVICES = ("cuda", "xpu")


def check_device(tensors: list[torch.Tensor], where: str) -> torch.device:
    dev = tensors[0].device
    if dev.type not in SUPPORTED_DEVICES:
        raise KernelInputError(
            f"{where}: the fused kernel runs on CUDA or XPU tensors, got {dev}; use "
            "unfused_decode_attention on this device"
        )
    for t in tensors[1:]:
        if t.device != dev:
            raise KernelInputError(f"{where}: tensors on {dev} and {t.device}; move them together")
    return dev


def check_out(out: torch.Tensor | None, q: torch.Tensor, where: str) -> torch.Tensor:
    if out is None:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.shape != q.shape or not out.is_floating_point() or out.device != q.device:
        raise KernelInputError(
            f"{where}: out must be a floating tensor of shape {tuple(q.shape)} on {q.device}, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
        )
    return out


def or_full(given: torch.Tensor | None, b: int, t: int, dev: torch.device) -> torch.Tensor:
    """``given``, or int32 lengths of ``t`` for every sequence."""
    return given if given is not None else torch.full((b,), t, dtype=torch.int32, device=dev)


def given_lens(
    seq_lens: torch.Tensor | None, b: int, t: int, dev: torch.device, check_values: bool, where: str
) -> torch.Tensor | None:
    """The caller's seq_lens as int32, checked; None when every sequence is full."""
    if seq_lens is None:
        return None
    if seq_lens.shape != (b,) or seq_lens.dtype not in (torch.int32, torch.int64):
        raise KernelInputError(
            f"{where}: seq_lens must be int32/int64 of shape ({b},), got {seq_lens.dtype} "
            f"{tuple(seq_lens.shape)}"
        )
    if seq_lens.device != dev:
        raise KernelInputError(f"{where}: seq_lens is on {seq_lens.device}, the cache on {dev}")
    if check_values and bool(((seq_lens < 1) | (seq_lens > t)).any()):
        raise KernelInputError(f"{where}: every seq_lens entry must lie in [1, {t}]")
    return seq_lens.to(torch.int32).contiguous()


def seq_lens_or_full(
    seq_lens: torch.Tensor | None, b: int, t: int, dev: torch.device, check_values: bool, where: str
) -> torch.Tensor:
    return or_full(given_lens(seq_lens, b, t, dev, check_values, where), b, t, dev)


def check_head_size(d: int, where: str) -> None:
    if d < 16 or d & (d - 1):
        raise KernelInputError(
            f"{where}: head size {d} is not supported by the fused kernel (a power of two ≥ 16)"
        )


def check_finite(q: torch.Tensor, check_values: bool, where: str) -> None:
    if check_values and not bool(torch.isfinite(q).all()):
        raise KernelInputError(f"{where}: q holds NaN or infinite values")


def check_backend(cfg: LaunchConfig, where: str) -> None:
    if cfg.backend not in BACKENDS:
        raise KernelInputError(
            f"{where}: LaunchConfig.backend is {cfg.backend!r}; expected one of {BACKENDS}"
        )
    if cfg.cuda_warps not in CUDA_WARPS:
        raise KernelInputError(
            f"{where}: LaunchConfig.cuda_warps is {cfg.cuda_warps!r}; expected one of {CUDA_WARPS}"
        )
    if not isinstance(cfg.cuda_wide_table, bool):
        raise KernelInputError(
            f"{where}: LaunchConfig.cuda_wide_table is {cfg.cuda_wide_table!r}; expected True "
            "or False"
        )
    if cfg.cuda_wide_table and cfg.cuda_warps != 16:
        raise KernelInputError(
            f"{where}: LaunchConfig.cuda_wide_table needs cuda_warps=16 (its 64 KB table "
            f"leaves no room for two CTAs a multiprocessor); cuda_warps is {cfg.cuda_warps}"
        )
    if not isinstance(cfg.cuda_pdl, bool):
        raise KernelInputError(
            f"{where}: LaunchConfig.cuda_pdl is {cfg.cuda_pdl!r}; expected True or False"
        )
