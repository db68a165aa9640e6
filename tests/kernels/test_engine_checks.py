"""The conformance checks catch a wrong engine (fast: the engine's rule in torch stands in).

A cache packed by the engine's own rule, in the engine's slot layout, must pass every
bit-exact check; one flipped byte, a key code moved one cell, or a decode output nudged past
1e-3 must fail the check that owns it.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from servelab.kernels.engine import cases as engine_cases
from servelab.kernels.engine import checks, driver
from servelab.kernels.engine.cases import Layout
from servelab.kernels.turboquant import pack_bits
from servelab.kernels.turboquant.attention import reference_decode_attention

pytestmark = [pytest.mark.kernels, pytest.mark.engine_kernels]

D = 64


@pytest.fixture(scope="module")
def static(engine_bundle: Any) -> dict[str, Any]:
    return driver.static_records(engine_bundle.root, D, ["turboquant_4bit_nc"])


def _pack(case: engine_cases.Case, rec: dict[str, Any]) -> torch.Tensor:
    """The engine's store in torch: its slot layout, its rounding rules."""
    lay = Layout.from_engine(D, rec)
    k, v = case.k.float(), case.v.float()
    codes = checks._engine_rule_key_codes(k, rec["hadamard"].float(), rec["midpoints"].float())
    norm = k.norm(dim=-1).half().view(torch.uint8).reshape(*k.shape[:3], 2)
    q, s16, z16, _ = checks._engine_rule_values(v, lay.value_bits)
    meta = torch.stack((s16, z16), -1).view(torch.uint8).reshape(*k.shape[:3], 4)
    slot = torch.cat(
        [pack_bits(codes, lay.key_bits), norm, pack_bits(q, lay.value_bits), meta], dim=-1
    )
    slot = torch.nn.functional.pad(slot, (0, int(rec["slot_size_aligned"]) - slot.shape[-1]))
    b, h, t, n = slot.shape
    cache = torch.zeros(case.block_table.numel(), case.block_size, h, n, dtype=torch.uint8)
    pos = torch.arange(t)
    pages = case.block_table[:, pos // case.block_size].long()
    cache[pages, (pos % case.block_size).expand(b, t)] = slot.permute(0, 2, 1, 3)
    return cache


def _case() -> engine_cases.Case:
    return engine_cases.random_case("random", 5, 2, 2, 6, 32, D, [32, 9])


def test_a_cache_packed_by_the_engine_rule_passes(static: dict[str, Any]) -> None:
    rec = static["presets"]["turboquant_4bit_nc"]
    case = _case()
    rows = checks.check_store("turboquant_4bit_nc", case, rec, _pack(case, rec))
    exact = [r for r in rows if "bit_exact" in r.check or "norm" in r.check]
    assert exact and all(r.verdict == "pass" for r in exact), [r.line() for r in exact]


def test_a_moved_key_code_and_a_flipped_value_byte_fail(static: dict[str, Any]) -> None:
    rec = static["presets"]["turboquant_4bit_nc"]
    case = _case()
    cache = _pack(case, rec)
    page = int(case.block_table[1, 0])
    cache[page, 3, 1, 0] ^= 0x01  # a key code one cell over (low nibble's lowest bit)
    cache[page, 3, 1, 40] ^= 0x10  # a value code (byte 34 + 6 of the value plane)
    rows = {r.check: r for r in checks.check_store("turboquant_4bit_nc", case, rec, cache)}
    assert rows["random/key_codes_bit_exact"].verdict == "fail"
    assert "[1, 1, 3, 0]" in rows["random/key_codes_bit_exact"].detail  # the input that shows it
    assert rows["random/value_bytes_bit_exact"].verdict == "fail"


def test_decode_checks_pass_the_exact_answer_and_fail_a_nudged_one(
    static: dict[str, Any],
) -> None:
    rec = static["presets"]["turboquant_4bit_nc"]
    case = _case()
    cache = _pack(case, rec)
    planes = engine_cases.engine_planes(cache, case, Layout.from_engine(D, rec))
    k, v = checks.engine_dequantize(planes, Layout.from_engine(D, rec), rec)
    exact = reference_decode_attention(case.q.double(), k, v, seq_lens=case.seq_lens)
    rows = checks.check_decode("turboquant_4bit_nc", case, rec, cache, exact.float())
    assert [r.verdict for r in rows] == ["pass", "pass"], [r.line() for r in rows]
    nudged = exact.float().clone()
    nudged[1, 4, 7] += 5e-3
    rows = checks.check_decode("turboquant_4bit_nc", case, rec, cache, nudged)
    assert rows[0].verdict == "fail"
