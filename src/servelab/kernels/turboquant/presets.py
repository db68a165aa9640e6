"""vLLM's TurboQuant KV presets and their byte rules (docs/kernels-turboquant.md §2.5).

Per token and KV head, at head size d:
- Lloyd–Max key: ⌈d·b/8⌉ code bytes + 2 (fp16 norm); FP8 key: d bytes, no norm.
- value: ⌈d·b_v/8⌉ code bytes + 4 (fp16 scale and zero of an asymmetric uniform quantizer,
  not rotated).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

from servelab.errors import KernelInputError
from servelab.kernels.turboquant.packing import packed_bytes

KeyFormat = Literal["fp8", "lloyd_max"]

FP16_BYTES = 2
KEY_NORM_BYTES = 2  # one fp16 scale per key vector
VALUE_META_BYTES = 4  # fp16 scale + fp16 zero per value vector


@dataclass(frozen=True)
class KVPreset:
    name: str
    key_format: KeyFormat
    key_bits: int
    value_bits: int
    norm_correction: bool
    quoted_compression: float | None  # vLLM's docstring figure (Qwen3-4B), not derived

    def key_code_bytes(self, head_size: int) -> int:
        return head_size if self.key_format == "fp8" else packed_bytes(head_size, self.key_bits)

    def key_meta_bytes(self) -> int:
        return 0 if self.key_format == "fp8" else KEY_NORM_BYTES

    def value_code_bytes(self, head_size: int) -> int:
        return packed_bytes(head_size, self.value_bits)

    def key_bytes(self, head_size: int) -> int:
        return self.key_code_bytes(head_size) + self.key_meta_bytes()

    def value_bytes(self, head_size: int) -> int:
        return self.value_code_bytes(head_size) + VALUE_META_BYTES

    def bytes_per_token_head(self, head_size: int) -> int:
        """K + V bytes that one token of one KV head occupies."""
        return self.key_bytes(head_size) + self.value_bytes(head_size)

    def byte_ratio(self, head_size: int) -> float:
        """fp16 K + V bytes over compressed bytes (the honest compression ratio)."""
        return 2 * head_size * FP16_BYTES / self.bytes_per_token_head(head_size)


PRESETS: Mapping[str, KVPreset] = MappingProxyType(
    {
        p.name: p
        for p in (
            KVPreset("turboquant_k8v4", "fp8", 8, 4, False, 2.6),
            KVPreset("turboquant_4bit_nc", "lloyd_max", 4, 4, True, 3.8),
            KVPreset("turboquant_k3v4_nc", "lloyd_max", 3, 4, True, 3.5),
            KVPreset("turboquant_3bit_nc", "lloyd_max", 3, 3, True, 4.9),
        )
    }
)


def get_preset(name: str) -> KVPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise KernelInputError(
            f"unknown TurboQuant preset {name!r}; known presets: {', '.join(PRESETS)}"
        ) from None
