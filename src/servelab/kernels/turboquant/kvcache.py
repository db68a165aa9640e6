"""A compressed K/V cache in vLLM's TurboQuant byte budget, and the codec that fills it.

Planes, logical shape [batch, kv_heads, tokens, ...] (any strides):
- ``key_codes``  uint8 [B, H, T, key_code_bytes]: packed Lloyd–Max indices, or FP8 e4m3 bytes
- ``key_scales`` fp16  [B, H, T] (Lloyd–Max keys only): ‖k‖, or ‖k‖/‖c_idx‖ with norm correction
- ``value_codes`` uint8 [B, H, T, value_code_bytes]: packed uniform indices
- ``value_scale_zero`` fp16 [B, H, T, 2]: scale and zero of the asymmetric uniform quantizer

Keys are dequantized as k̃ = scale·Πᵀ·c_idx, values as ṽ = idx·scale + zero. The planes hold
exactly the bytes of the preset's rule (``bytes_per_token_head``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from servelab.errors import KernelInputError
from servelab.kernels.turboquant.codebook import Law, distortion, norm_corrected_distortion
from servelab.kernels.turboquant.packing import pack_bits, unpack_bits
from servelab.kernels.turboquant.presets import KVPreset, get_preset
from servelab.kernels.turboquant.quantizer import MSECode, MSEQuantizer, check_finite_float
from servelab.kernels.turboquant.rotation import RotationKind

FP8_MAX = 448.0
FP16_MAX = 65504.0


@dataclass(frozen=True, eq=False)
class PackedKVCache:
    preset: KVPreset
    head_size: int
    key_codes: torch.Tensor
    key_scales: torch.Tensor | None
    value_codes: torch.Tensor
    value_scale_zero: torch.Tensor

    @property
    def batch(self) -> int:
        return int(self.key_codes.shape[0])

    @property
    def kv_heads(self) -> int:
        return int(self.key_codes.shape[1])

    @property
    def tokens(self) -> int:
        return int(self.key_codes.shape[2])

    @property
    def device(self) -> torch.device:
        return self.key_codes.device

    def planes(self) -> tuple[torch.Tensor, ...]:
        rest = (self.value_codes, self.value_scale_zero)
        return (
            (self.key_codes,) if self.key_scales is None else (self.key_codes, self.key_scales)
        ) + rest

    def bytes_per_token_head(self) -> int:
        """Bytes the planes actually hold per token and KV head (from their shapes)."""
        total = 0
        for p in self.planes():
            per_vector = p.shape[3:].numel() if p.ndim > 3 else 1
            total += per_vector * p.element_size()
        return total

    def nbytes(self) -> int:
        return self.bytes_per_token_head() * self.batch * self.kv_heads * self.tokens

    def validate(self, where: str) -> None:
        """Dtype, shape and device of every plane against the preset; raises KernelInputError."""
        p, d = self.preset, self.head_size
        if self.key_codes.ndim != 4:
            raise KernelInputError(
                f"{where}: key_codes must be 4-D [batch, kv_heads, tokens, bytes], got shape "
                f"{tuple(self.key_codes.shape)}"
            )
        lead = tuple(self.key_codes.shape[:3])
        expected: list[tuple[str, torch.Tensor | None, torch.dtype, tuple[int, ...]]] = [
            ("key_codes", self.key_codes, torch.uint8, (*lead, p.key_code_bytes(d))),
            ("value_codes", self.value_codes, torch.uint8, (*lead, p.value_code_bytes(d))),
            ("value_scale_zero", self.value_scale_zero, torch.float16, (*lead, 2)),
        ]
        if p.key_format == "lloyd_max":
            expected.append(("key_scales", self.key_scales, torch.float16, lead))
        elif self.key_scales is not None:
            raise KernelInputError(f"{where}: preset {p.name} has FP8 keys and no key_scales plane")
        for name, t, dtype, shape in expected:
            if t is None:
                raise KernelInputError(f"{where}: preset {p.name} needs a {name} plane")
            if t.dtype != dtype:
                raise KernelInputError(
                    f"{where}: {name} has dtype {t.dtype}; preset {p.name} stores {dtype}"
                )
            if tuple(t.shape) != shape:
                raise KernelInputError(
                    f"{where}: {name} has shape {tuple(t.shape)}; preset {p.name} at head size "
                    f"{d} needs {shape} ({p.bytes_per_token_head(d)} bytes per token and head)"
                )
            if t.device != self.key_codes.device:
                raise KernelInputError(
                    f"{where}: {name} is on {t.device} but key_codes is on {self.key_codes.device}"
                )


@dataclass(frozen=True, eq=False)
class KVCodec:
    """Encode and decode K/V [B, H, T, d] with one preset's formats."""

    preset: KVPreset
    head_size: int
    key_quantizer: MSEQuantizer | None  # None for FP8 keys

    @classmethod
    def build(
        cls,
        preset: str | KVPreset,
        head_size: int,
        rotation: RotationKind = "fixed_hadamard",
        seed: int | None = 0,
        law: Law = "gaussian",
    ) -> KVCodec:
        """Defaults copy vLLM: Sylvester Hadamard without signs, Gaussian-limit codebook."""
        p = get_preset(preset) if isinstance(preset, str) else preset
        if p.value_bits not in range(1, 9) or (p.key_format == "fp8" and p.key_bits != 8):
            raise KernelInputError(
                f"KVCodec: preset {p.name} asks for value bit width {p.value_bits} / key bit "
                f"width {p.key_bits}; values take 1 to 8 bits, FP8 keys exactly 8"
            )
        quantizer = None
        if p.key_format == "lloyd_max":
            quantizer = MSEQuantizer.build(
                head_size, p.key_bits, rotation, seed, law, norm_correction=p.norm_correction
            )
        elif isinstance(head_size, bool) or not isinstance(head_size, int) or head_size < 1:
            raise KernelInputError(f"KVCodec: head size {head_size!r} must be a positive integer")
        return cls(p, head_size, quantizer)

    def centroid_table(self, device: torch.device) -> torch.Tensor:
        """√d·c_k as float32 (the fused kernel folds 1/√d into the query scale)."""
        if self.key_quantizer is None:
            raise KernelInputError(f"KVCodec: preset {self.preset.name} has no key codebook")
        cb = self.key_quantizer.codebook
        return torch.tensor(cb.scaled_centroids(), dtype=torch.float32, device=device)

    def predicted_key_distortion(self) -> float | None:
        """E‖u − ũ‖² of a unit key whose rotated coordinates follow the sphere law.

        Holds for keys in general position (a Haar rotation makes it hold for every key; a
        fixed Hadamard fails on adversarial keys). None for FP8 keys, which have no codebook.
        """
        if self.key_quantizer is None:
            return None
        cb = self.key_quantizer.codebook
        if self.key_quantizer.norm_correction:
            return norm_corrected_distortion(cb, "exact")
        return distortion(cb, "exact")

    def _check_kv(self, x: torch.Tensor, name: str) -> None:
        check_finite_float(x, self.head_size, f"KVCodec.encode({name})")
        if x.ndim != 4:
            raise KernelInputError(
                f"KVCodec.encode: {name} must be 4-D [batch, kv_heads, tokens, head_size], got "
                f"shape {tuple(x.shape)}"
            )

    def encode(self, k: torch.Tensor, v: torch.Tensor) -> PackedKVCache:
        self._check_kv(k, "k")
        self._check_kv(v, "v")
        if k.shape != v.shape or k.device != v.device:
            raise KernelInputError(
                f"KVCodec.encode: k {tuple(k.shape)} on {k.device} and v {tuple(v.shape)} on "
                f"{v.device} must match"
            )
        key_codes, key_scales = self._encode_keys(k)
        value_codes, value_scale_zero = self._encode_values(v)
        return PackedKVCache(
            self.preset, self.head_size, key_codes, key_scales, value_codes, value_scale_zero
        )

    def _encode_keys(self, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.key_quantizer is None:
            fp8 = k.float().clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
            return fp8.view(torch.uint8).contiguous(), None
        code = self.key_quantizer.quantize(k)
        if bool((code.scales > FP16_MAX).any()):
            raise KernelInputError(
                "KVCodec.encode(k): a key norm exceeds the fp16 range the cache stores it in"
            )
        packed = pack_bits(code.indices, self.preset.key_bits, check_range=False)
        return packed, code.scales.to(torch.float16)

    def _encode_values(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        levels = (1 << self.preset.value_bits) - 1
        vf = v.float()
        lo = vf.amin(dim=-1)
        hi = vf.amax(dim=-1)
        if bool((hi.abs() > FP16_MAX).any() or (lo.abs() > FP16_MAX).any()):
            raise KernelInputError("KVCodec.encode(v): a value exceeds the fp16 range of the cache")
        scale16 = ((hi - lo) / levels).to(torch.float16)
        zero16 = lo.to(torch.float16)
        scale = scale16.float().unsqueeze(-1)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        idx = torch.round((vf - zero16.float().unsqueeze(-1)) / safe).clamp_(0, levels)
        idx = torch.where(scale > 0, idx, torch.zeros_like(idx)).to(torch.uint8)
        packed = pack_bits(idx, self.preset.value_bits, check_range=False)
        return packed, torch.stack((scale16, zero16), dim=-1)

    def decode(
        self, cache: PackedKVCache, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantize both planes to [B, H, T, d] (the unfused path's first half)."""
        self.check_cache(cache, "KVCodec.decode")
        d = self.head_size
        if self.key_quantizer is None:
            k = cache.key_codes.view(torch.float8_e4m3fn).to(dtype)
        else:
            if cache.key_scales is None:  # validate() has refused this already
                raise KernelInputError("KVCodec.decode: Lloyd–Max keys need key_scales")
            idx = unpack_bits(cache.key_codes, self.preset.key_bits, d)
            k = self.key_quantizer.dequantize(MSECode(idx, cache.key_scales.float()), dtype)
        vidx = unpack_bits(cache.value_codes, self.preset.value_bits, d).to(dtype)
        sz = cache.value_scale_zero.to(dtype)
        v = vidx * sz[..., 0:1] + sz[..., 1:2]
        return k, v

    def check_cache(self, cache: PackedKVCache, where: str) -> None:
        """Refuse a cache made for another preset or head size, or with malformed planes."""
        if cache.preset != self.preset or cache.head_size != self.head_size:
            raise KernelInputError(
                f"{where}: cache was made for {cache.preset.name} at head size "
                f"{cache.head_size}, codec is {self.preset.name} at {self.head_size}"
            )
        cache.validate(where)
