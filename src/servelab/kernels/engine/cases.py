"""Input cases for the engine's store and decode, and reading back the engine's packed cache.

A case holds K/V in servelab's layout [B, Hk, T, d] and the same tokens laid out as the engine
receives them: flat [B·T, Hk, d] with a slot mapping through a shuffled block table, so the
store scatters into random pages and the decode gathers them back. ``engine_planes`` undoes
the engine's slot layout ([key bytes | value codes | fp16 scale | fp16 zero | pad] per token
and KV head, vLLM's ``TurboQuantConfig``) into planes indexed like servelab's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from servelab.kernels.turboquant.rotation import sylvester_hadamard


@dataclass(frozen=True)
class Case:
    name: str
    k: torch.Tensor  # [B, Hk, T, d], float32 or the served dtype
    v: torch.Tensor
    q: torch.Tensor  # [B, Hq, d], empty for store-only cases
    seq_lens: torch.Tensor  # [B] int32
    block_size: int
    block_table: torch.Tensor  # [B, T // block_size] int32, a permutation of pages
    splits: int
    what: str  # the input, in words, for a report line

    @property
    def decodes(self) -> bool:
        return self.q.numel() > 0

    def engine_inputs(self) -> dict[str, Any]:
        b, h, t, d = self.k.shape
        pos = torch.arange(t)
        slots = self.block_table[:, pos // self.block_size].long() * self.block_size + (
            pos % self.block_size
        )
        return {
            "key": self.k.permute(0, 2, 1, 3).reshape(b * t, h, d).contiguous(),
            "value": self.v.permute(0, 2, 1, 3).reshape(b * t, h, d).contiguous(),
            "slot_mapping": slots.reshape(-1).to(torch.int32),
            "num_blocks": int(self.block_table.numel()),
            "block_size": self.block_size,
            "query": self.q,
            "block_table": self.block_table,
            "seq_lens": self.seq_lens,
            "splits": self.splits,
        }


def _pages(b: int, t: int, block_size: int, gen: torch.Generator) -> torch.Tensor:
    n = b * (t // block_size)
    return torch.randperm(n, generator=gen).reshape(b, t // block_size).to(torch.int32)


def random_case(
    name: str,
    seed: int,
    b: int,
    hk: int,
    hq: int,
    t: int,
    d: int,
    seq_lens: list[int],
    block_size: int = 16,
    splits: int = 32,
    dtype: torch.dtype = torch.float32,
) -> Case:
    """Gaussian q, k, v (logit std 1 at scale 1/√d), ragged lengths, shuffled pages.

    ``dtype`` is what the engine receives (the backend serves fp16/bf16); the decode output
    comes back in the query's dtype.
    """
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(b, hk, t, d, generator=g).to(dtype)
    v = torch.randn(b, hk, t, d, generator=g).to(dtype)
    q = torch.randn(b, hq, d, generator=g).to(dtype)
    what = (
        f"Gaussian q/k/v in {str(dtype).removeprefix('torch.')}, B={b}, Hq={hq}, Hk={hk}, "
        f"T={t}, seq_lens={seq_lens}, d={d}, block {block_size}, {splits} splits, seed {seed}"
    )
    return Case(
        name,
        k,
        v,
        q,
        torch.tensor(seq_lens, dtype=torch.int32),
        block_size,
        _pages(b, t, block_size, g),
        splits,
        what,
    )


def adversarial_cases(d: int, seed: int, tokens: int = 64) -> list[Case]:
    """Store-only inputs the fixed Hadamard and the fp16 metadata handle badly (§2.6)."""
    g = torch.Generator().manual_seed(seed)
    h = sylvester_hadamard(d).float()
    t = tokens
    scale = torch.rand(1, 1, t, 1, generator=g) * 3 + 0.5
    noise_v = torch.randn(1, 1, t, d, generator=g)
    out: list[Case] = []

    def case(name: str, k: torch.Tensor, v: torch.Tensor, what: str) -> Case:
        return Case(
            name,
            k.contiguous(),
            v.contiguous(),
            torch.empty(0),
            torch.tensor([t], dtype=torch.int32),
            16,
            _pages(1, t, 16, g),
            32,
            what,
        )

    out.append(
        case(
            "constant",
            torch.ones(1, 1, t, d) * scale,
            noise_v,
            f"keys = s·(1, …, 1) (a Hadamard row), s in [0.5, 3.5], d={d}, {t} tokens",
        )
    )
    rows = h[torch.randint(0, d, (t,), generator=g)].reshape(1, 1, t, d)
    out.append(
        case(
            "hadamard_rows",
            rows * scale,
            noise_v,
            f"keys = s·(random row of the ±1 Sylvester Hadamard), d={d}, {t} tokens",
        )
    )
    k_rand = torch.randn(1, 1, t, d, generator=g)
    out.append(
        case(
            "value_offset",
            k_rand,
            300.0 + 0.1 * noise_v,
            f"values = 300 + 0.1·N(0, 1) (a row's range ≈ 0.6, far below the offset), d={d}",
        )
    )
    out.append(
        case(
            "fp8_out_of_range",
            k_rand * 400.0,
            noise_v,
            f"keys = 400·N(0, 1): |k| past FP8 e4m3's 448 in ~30 % of coordinates, d={d}",
        )
    )
    return out


@dataclass(frozen=True)
class Layout:
    head_size: int
    key_fp8: bool
    key_bits: int  # 0 for FP8 keys
    value_bits: int
    key_packed_size: int
    norm_correction: bool

    @classmethod
    def from_engine(cls, d: int, rec: dict[str, Any]) -> Layout:
        return cls(
            d,
            bool(rec["key_fp8"]),
            int(rec["key_mse_bits"]),
            int(rec["value_quant_bits"]),
            int(rec["key_packed_size"]),
            bool(rec["norm_correction"]),
        )

    @property
    def key_code_bytes(self) -> int:
        return self.head_size if self.key_fp8 else math.ceil(self.head_size * self.key_bits / 8)

    @property
    def value_code_bytes(self) -> int:
        return math.ceil(self.head_size * self.value_bits / 8)


def _fp16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).squeeze(-1)


def engine_planes(cache: torch.Tensor, case: Case, layout: Layout) -> dict[str, torch.Tensor]:
    """The engine cache [blocks, block_size, Hk, slot] as planes [B, Hk, T, ...]."""
    b, _, t, _ = case.k.shape
    pos = torch.arange(t)
    pages = case.block_table[:, pos // case.block_size].long()  # [B, T]
    slots = cache[pages, (pos % case.block_size).expand(b, t)]  # [B, T, Hk, slot]
    slots = slots.permute(0, 2, 1, 3)
    kc = layout.key_code_bytes
    vo = layout.key_packed_size
    vc = layout.value_code_bytes
    planes = {
        "key_codes": slots[..., :kc].contiguous(),
        "value_codes": slots[..., vo : vo + vc].contiguous(),
        "value_scale": _fp16(slots[..., vo + vc : vo + vc + 2]),
        "value_zero": _fp16(slots[..., vo + vc + 2 : vo + vc + 4]),
    }
    if not layout.key_fp8:
        planes["key_norm"] = _fp16(slots[..., kc : kc + 2])
    return planes
