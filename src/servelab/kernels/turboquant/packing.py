"""Bit packing of b-bit codes into bytes.

Layout: one little-endian bit stream per vector. Code j occupies stream bits
[j·b, (j + 1)·b), least significant bit first, and stream bit i lives in byte i // 8 at bit
i % 8. At b = 4 this is two codes per byte, the even coordinate in the low nibble; at b = 3
codes straddle bytes. A vector of d codes takes exactly ⌈d·b/8⌉ bytes. The fused decode
kernel reads the same layout.
"""

from __future__ import annotations

import torch

from servelab.errors import KernelInputError

PACKABLE_BITS: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)


def packed_bytes(dim: int, bits: int) -> int:
    """Bytes that d codes of b bits take: ⌈d·b/8⌉."""
    _check_bits(bits, "packed_bytes")
    return (dim * bits + 7) // 8


def _check_bits(bits: int, where: str) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in PACKABLE_BITS:
        raise KernelInputError(f"{where}: bit width {bits!r} must be an integer from 1 to 8")


def pack_bits(codes: torch.Tensor, bits: int, check_range: bool = True) -> torch.Tensor:
    """Pack uint8 codes [..., d] (each < 2^bits) into uint8 [..., ⌈d·bits/8⌉].

    ``check_range=False`` skips the range check (a device sync) for codes this package made.
    """
    _check_bits(bits, "pack_bits")
    if codes.dtype != torch.uint8:
        raise KernelInputError(f"pack_bits: codes must be uint8, got {codes.dtype}")
    if codes.ndim == 0:
        raise KernelInputError("pack_bits: codes need at least one dimension")
    if bits == 8:
        return codes.clone()
    if check_range and codes.numel() and int(codes.max()) >= (1 << bits):
        raise KernelInputError(f"pack_bits: a code is ≥ 2^{bits}; it does not fit in {bits} bits")
    d = codes.shape[-1]
    if bits == 4 and d % 2 == 0:
        pairs = codes.reshape(*codes.shape[:-1], d // 2, 2)
        return (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous()
    shifts = torch.arange(bits, device=codes.device, dtype=torch.uint8)
    stream = ((codes.unsqueeze(-1) >> shifts) & 1).reshape(*codes.shape[:-1], d * bits)
    nbytes = packed_bytes(d, bits)
    pad = nbytes * 8 - d * bits
    if pad:
        stream = torch.nn.functional.pad(stream, (0, pad))
    stream = stream.reshape(*codes.shape[:-1], nbytes, 8)
    weights = torch.arange(8, device=codes.device, dtype=torch.uint8)
    return (stream << weights).sum(dim=-1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of pack_bits: uint8 [..., ⌈dim·bits/8⌉] to uint8 codes [..., dim]."""
    _check_bits(bits, "unpack_bits")
    if packed.dtype != torch.uint8:
        raise KernelInputError(f"unpack_bits: packed codes must be uint8, got {packed.dtype}")
    nbytes = packed_bytes(dim, bits)
    if packed.ndim == 0 or packed.shape[-1] != nbytes:
        raise KernelInputError(
            f"unpack_bits: last dimension of shape {tuple(packed.shape)} must be {nbytes} bytes "
            f"for {dim} codes of {bits} bits"
        )
    if bits == 8:
        return packed.clone()
    if bits == 4 and dim % 2 == 0:
        lo, hi = packed & 15, packed >> 4
        return torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], dim)
    weights = torch.arange(8, device=packed.device, dtype=torch.uint8)
    stream = ((packed.unsqueeze(-1) >> weights) & 1).reshape(*packed.shape[:-1], nbytes * 8)
    stream = stream[..., : dim * bits].reshape(*packed.shape[:-1], dim, bits)
    shifts = torch.arange(bits, device=packed.device, dtype=torch.uint8)
    return (stream << shifts).sum(dim=-1, dtype=torch.int32).to(torch.uint8)
