"""Claims-registry export: one claim per decode/output throughput measurement, with the
profile's card count and tensor-parallel size (issue 15 item 7)."""

from __future__ import annotations

from pathlib import Path

from servelab.baselines import Fingerprint
from servelab.claims import claims, tensor_parallel, validate_claim
from servelab.figures import Figure, Identity, Shape
from servelab.hardware import Accelerator, HostIdentity, StackIdentity
from servelab.profiles import load_profile
from servelab.records import SessionInfo, TargetInfo, build_record
from servelab.target import make_target

PROFILES = Path(__file__).resolve().parents[1] / "fixtures" / "profiles"
B70 = Accelerator("xpu", 0, "Intel(R) Arc(TM) Pro B70 Graphics", 32 * 2**30, "drv1")
HOST = HostIdentity(
    key="xpu-2x-intel-arc-pro-b70-graphics-12345678",
    cpu_model="AMD Threadripper",
    cpu_cores=24,
    cpu_threads=48,
    ram_bytes=256 * 2**30,
    os="Ubuntu 24.04.2 LTS",
    kernel="6.14.0-24-generic",
    machine="x86_64",
    accelerators=(B70, Accelerator("xpu", 1, B70.name, B70.memory_bytes, "drv1")),
)
IDENT = Identity("b70-gemma", "vllm 0.11.1+xpu", HOST.key, "gemma-4-12b")
SESSION = SessionInfo(1764090000.0, 1764090100.0, "pytest -m perf", 0, False, "abc123", "lab")


def fig(
    metric: str,
    unit: str,
    value: float,
    c: int = 1,
    prompt: int = 128,
    direction: str = "higher",
    ident: Identity = IDENT,
    output: int = 64,
) -> Figure:
    return Figure(
        metric=metric,
        title=metric.replace("_", " "),
        unit=unit,
        direction=direction,  # type: ignore[arg-type]
        runs=(value * 0.99, value, value * 1.01),
        shape=Shape(prompt, output, c),
        warm=True,
        identity=ident,
    )


FIGS = [
    fig("output_throughput", "tok/s", 42.0, c=8),
    fig("total_token_throughput", "tok/s", 90.0, c=8),
    fig("mean_tpot_ms", "ms", 20.0, c=8, direction="lower"),
]
# The two-card host's profile uses both cards.
TARGET = TargetInfo(
    "b70-gemma",
    "gemma-4-12b",
    "vllm 0.11.1+xpu",
    Fingerprint(HOST.key, "vllm 0.11.1+xpu", "gemma-4-12b"),
    "bf16",
    StackIdentity("vllm 0.11.1+xpu", "vllm", "0.11.1", None, accelerator="xpu", cards=2),
)


def test_claims_pass_the_registry_rules_and_skip_latencies() -> None:
    # Moved from test_records.py. A decode figure joins: a total (prompt + output) rate is
    # not an output claim any more (issue 15 item 7), so the two tok/s claims are decode
    # and output.
    decode = fig("decode_tok_s", "tok/s", 12.0, c=1)
    cs = claims(build_record(SESSION, HOST, [TARGET], [*FIGS, decode]))
    assert len(cs) == 2  # two tok/s figures, the ms figure is not a claim
    for c in cs:
        assert validate_claim(c) == []
        assert c["recipe"]["cards"] == 2 and c["claimed"]["date"] == "2025-11-25"
    broken = {**cs[0], "id": "Not_Valid", "claimed": {**cs[0]["claimed"], "tok_s": 0}}
    assert len(validate_claim(broken)) == 2
    assert "total_token_throughput" not in str([c["claimed"]["metric"] for c in cs])


def lab_record() -> dict[str, object]:
    """A gemma4-12b-c8 record (TP4 on 4 B70s) measured from a host that sees two cards."""
    profile = load_profile(PROFILES / "gemma4-12b-c8.toml")
    ident = Identity(profile.name, "vllm 0.11.1+xpu", HOST.key, profile.model.served_name)
    target = make_target(ident, profile, HOST)
    figs = [
        fig("decode_tok_s", "tok/s", 48.0, c=1, prompt=119, output=512, ident=ident),
        fig("prefill_tok_s_p2048", "tok/s", 1750.0, prompt=2048, output=1, ident=ident),
        fig("ttft_ms_p2048", "ms", 1170.0, prompt=2048, output=1, direction="lower", ident=ident),
        fig("session_reload_wall_tok_s", "tok/s", 300.0, c=8, prompt=9234, ident=ident),
        fig("session_reload_first_to_last_tok_s", "tok/s", 310.0, c=8, prompt=9234, ident=ident),
    ]
    for c, rate in ((1, 45.0), (2, 88.0), (4, 170.0), (8, 640.0)):
        figs += [
            fig(f"output_throughput_c{c}", "tok/s", rate, c=c, prompt=119, output=512, ident=ident),
            fig(f"wall_aggregate_tok_s_c{c}", "tok/s", rate * 1.01, c=c, prompt=119, output=512,
                ident=ident),
            fig(f"total_token_throughput_c{c}", "tok/s", rate * 1.2, c=c, prompt=119, output=512,
                ident=ident),
            fig(f"median_tpot_ms_c{c}", "ms", 1000 / rate, c=c, prompt=119, output=512,
                direction="lower", ident=ident),
        ]  # fmt: skip
    return build_record(SESSION, HOST, [target], figs)


def test_tp_and_cards_come_from_the_profile_not_the_host() -> None:
    cs = claims(lab_record())
    assert cs
    for c in cs:
        assert validate_claim(c) == []
        assert c["recipe"]["tp"] == 4  # --tensor-parallel-size 4 in the rendered args
        assert c["recipe"]["cards"] == 4  # hardware.count, though this host shows 2


def test_only_decode_and_output_rates_are_tok_s_claims() -> None:
    metrics = sorted(c["id"].split("-2025")[0] for c in claims(lab_record()))
    assert not [m for m in metrics if "prefill" in m or "session" in m or "total" in m]
    assert metrics == sorted(
        ["gemma4-12b-c8-decode-tok-s-p119-o512-c1-warm"]
        + [f"gemma4-12b-c8-output-throughput-c{c}-p119-o512-c{c}-warm" for c in (1, 2, 4, 8)]
    )


def test_one_claim_per_concurrency_level_quoting_the_wall_aggregate() -> None:
    cs = [c for c in claims(lab_record()) if "output-throughput-c8" in c["id"]]
    assert len(cs) == 1
    (c,) = cs
    assert c["claimed"]["tok_s"] == 640.0
    assert (
        "wall aggregate tok s c8 [wall_aggregate_tok_s_c8]: 646.4 tok/s" in (c["claimed"]["metric"])
    )
    assert len({c["id"] for c in claims(lab_record())}) == len(claims(lab_record()))


def test_external_endpoint_claims_say_the_card_count_is_unknown() -> None:
    ident = Identity("external", "vllm 0.32.0", HOST.key, "m")
    target = make_target(ident, None, HOST)
    (c,) = claims(build_record(SESSION, HOST, [target], [fig("decode_tok_s", "tok/s", 9.0,
                                                             ident=ident)]))  # fmt: skip
    assert c["recipe"]["cards"] == 1 and c["recipe"]["tp"] == 1
    assert "card count not recorded" in c["claimed"]["metric"]
    assert validate_claim(c) == []


def test_tensor_parallel_forms() -> None:
    assert tensor_parallel(["vllm", "serve", "m", "--tensor-parallel-size", "4"]) == 4
    assert tensor_parallel(["--tensor-parallel-size=2"]) == 2
    assert tensor_parallel(["-tp", "8"]) == 8
    assert tensor_parallel(["--pipeline-parallel-size", "2"]) is None
