"""Health receipts (issue 25 item 2): parsers on recorded tool output (fixtures/hardware,
missing and denied tools included), admission refusals with clear messages and no engine
started, the post-run check and the receipts in a session's record."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from servelab.profiles import Profile, load_profile
from servelab.receipts import (
    KERNEL_LOGS,
    NVIDIA_APPS,
    NVIDIA_HEALTH,
    XPU_DISCOVERY,
    XPU_PS,
    AdmissionError,
    Probe,
    Receipt,
    ToolOutput,
    admission_problems,
    admit,
    admit_into,
    classify,
    difference,
    parse_kernel_faults,
    parse_mem_available_gib,
    parse_nvidia_health,
    parse_xpu_ps,
    parse_xpu_stats,
    post_run_into,
    run_probe,
    take_receipt,
)
from servelab.session import SessionResults
from servelab.stop_policy import StopRecord

ROOT = Path(__file__).resolve().parents[1]
HW = ROOT / "fixtures" / "hardware"
MEMINFO = (HW / "meminfo.txt").read_text()  # 238.6 GiB available


def fx(name: str) -> str:
    return (HW / name).read_text()


Answers = Mapping[tuple[str, ...], ToolOutput | str]

DENIED_NVIDIA = classify(NVIDIA_HEALTH, 9, fx("nvidia-smi-denied.txt"), "")
DENIED_DMESG = classify(("dmesg",), 1, "", fx("dmesg-denied.txt"))


def probe_from(answers: Answers) -> Probe:
    """A probe answering recorded outputs by argv; anything else is a missing tool."""

    def probe(argv: Sequence[str]) -> ToolOutput:
        answer = answers.get(tuple(argv))
        if answer is None:
            return ToolOutput(tuple(argv), "missing", detail=f"{argv[0]} is not on PATH")
        if isinstance(answer, ToolOutput):
            return answer
        return ToolOutput(tuple(argv), "ok", answer)

    return probe


def xpu_answers(
    ps: str = "xpu-smi-ps-idle.json", stats1: str = "xpu-smi-stats-device-1.json"
) -> Answers:
    return {
        XPU_DISCOVERY: fx("xpu-smi-discovery.json"),
        XPU_PS: fx(ps),
        ("xpu-smi", "stats", "-d", "0", "-j"): fx("xpu-smi-stats-device-0.json"),
        ("xpu-smi", "stats", "-d", "1", "-j"): fx(stats1),
        KERNEL_LOGS[0]: DENIED_DMESG,
    }


def lab_profile(
    count: int = 2,
    min_free_memory_gib: float = 0.001,
    min_free_disk_gib: float = 0.001,
) -> Profile:
    """The lab's profile with floors this host meets whatever its state (the lab's 50 GiB of
    free disk failed the healthy-card tests on a developer's fuller disk); the floors have
    their own tests."""
    p = load_profile(ROOT / "fixtures" / "profiles" / "gemma4-12b-c8.toml")
    return dataclasses.replace(
        p,
        hardware=dataclasses.replace(p.hardware, count=count),
        limits=dataclasses.replace(
            p.limits,
            min_free_memory_gib=min_free_memory_gib,
            min_free_disk_gib=min_free_disk_gib,
        ),
        model=dataclasses.replace(p.model, path=str(ROOT)),  # a path that exists
    )


def cuda_profile() -> Profile:
    p = lab_profile()
    return dataclasses.replace(p, hardware=dataclasses.replace(p.hardware, accelerator="cuda"))


def receipt(profile: Profile, answers: Answers, **kw: Any) -> Receipt:
    return take_receipt(
        profile,
        "admission",
        probe=probe_from(answers),
        meminfo=lambda: MEMINFO,
        **kw,
    )


# ------------------------------------------------------------------- parsers


def test_nvidia_health_idle_busy_faulted_and_ecc() -> None:
    idle = parse_nvidia_health(fx("nvidia-smi-health-idle.csv"), fx("nvidia-smi-apps-idle.csv"))
    assert [(c.index, c.memory_used_mib, c.temperature_c, c.others, c.fault) for c in idle] == [
        (0, 1.0, 31.0, (), ""),
        (1, 1.0, 29.0, (), ""),
    ]
    assert idle[0].errors == {"ecc_uncorrected_volatile": 0}
    busy = parse_nvidia_health(fx("nvidia-smi-health-busy.csv"), fx("nvidia-smi-apps-busy.csv"))
    assert busy[0].others == ("pid 48211 (/usr/bin/python3, 71220 MiB)",) and not busy[1].others
    assert (
        parse_nvidia_health(
            fx("nvidia-smi-health-busy.csv"), fx("nvidia-smi-apps-busy.csv"), own_pids=[48211]
        )[0].others
        == ()
    )
    faulted = parse_nvidia_health(fx("nvidia-smi-health-faulted.txt"))
    assert [c.fault for c in faulted] == [
        "nvidia-smi reports [GPU requires reset]",
        "Unable to determine the device handle for GPU0000:41:00.0: Unknown Error",
    ]
    ecc = parse_nvidia_health(fx("nvidia-smi-health-ecc.csv"))
    assert ecc[0].fault == "2 uncorrected ECC error(s) since the driver loaded" and not ecc[1].fault


def test_xpu_stats_and_processes() -> None:
    used, temp, errors = parse_xpu_stats(fx("xpu-smi-stats-device-0.json"))
    assert (used, temp) == (212.5, 41.0)
    assert errors["reset"] == 0 and errors["cache_errors_uncorrectable"] == 0
    _, _, bad = parse_xpu_stats(fx("xpu-smi-stats-faulted.json"))
    assert bad["reset"] == 1 and bad["cache_errors_uncorrectable"] == 3
    assert parse_xpu_ps(fx("xpu-smi-ps-idle.json")) == {}  # xpu-smi itself is not a user
    assert parse_xpu_ps(fx("xpu-smi-ps-busy.json")) == {0: ["pid 39120 (python3, 23552 MiB)"]}
    assert parse_xpu_ps(fx("xpu-smi-ps-busy.json"), own_pids=[39120]) == {}


def test_kernel_fault_lines_and_since() -> None:
    lines = parse_kernel_faults(fx("dmesg-faults.txt"))
    assert len(lines) == 5, lines
    assert any("Device wedged" in x for x in lines) and any("NVRM: Xid" in x for x in lines)
    assert not any("Found BATTLEMAGE" in x or "GuC firmware" in x for x in lines)
    assert len(parse_kernel_faults(fx("dmesg-faults.txt"), since_s=1600.0)) == 2  # the OOM kill
    journal = parse_kernel_faults(fx("journalctl-k-faults.txt"))
    assert len(journal) == 2 and "AER: Uncorrected (Fatal)" in journal[1]


def test_missing_denied_and_failed_tools_are_answers() -> None:
    assert DENIED_NVIDIA.status == "denied"
    assert "Insufficient Permissions" in DENIED_NVIDIA.detail
    assert DENIED_DMESG.status == "denied" and "Operation not permitted" in DENIED_DMESG.detail
    xpu = classify(XPU_DISCOVERY, 1, "", fx("xpu-smi-denied.txt"))
    assert xpu.status == "denied"
    failed = classify(
        NVIDIA_HEALTH,
        9,
        "",
        "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver",
    )
    assert failed.status == "failed" and "exit 9" in failed.detail
    missing = run_probe(["servelab-no-such-tool-25", "--version"])
    assert missing.status == "missing" and "not on PATH" in missing.detail
    assert run_probe(["true"]).status == "ok"
    assert parse_mem_available_gib(MEMINFO) == pytest.approx(250212948 / 2**20)
    assert parse_mem_available_gib("") is None


# ------------------------------------------------------------------- admission


def test_admission_of_healthy_cards_passes_and_records_them(tmp_path: Path) -> None:
    r = receipt(lab_profile(), xpu_answers(), folders=[tmp_path])
    assert admission_problems(lab_profile(), r) == []
    assert [c.index for c in r.cards] == [0, 1] and r.cards[0].memory_used_mib == 212.5
    assert r.kernel_log.startswith("not readable: dmesg: denied")
    assert r.disk_free_gib[str(tmp_path)] is not None
    assert Receipt.from_dict(json.loads(json.dumps(r.to_dict()))) == r


def test_admission_refuses_a_busy_card() -> None:
    with pytest.raises(AdmissionError) as info:
        admit(
            lab_profile(),
            probe=probe_from(xpu_answers(ps="xpu-smi-ps-busy.json")),
            meminfo=lambda: MEMINFO,
        )
    msg = str(info.value)
    print(msg)
    assert msg.startswith("admission refused, no engine started:")
    assert (
        "card 0 (Intel(R) Arc(TM) Pro B70 Graphics) is busy with another process: "
        "pid 39120 (python3, 23552 MiB)" in msg
    )
    assert "stop it or wait until the card is free" in msg


def test_admission_refuses_a_faulted_card() -> None:
    with pytest.raises(AdmissionError) as info:
        admit(
            lab_profile(),
            probe=probe_from(xpu_answers(stats1="xpu-smi-stats-faulted.json")),
            meminfo=lambda: MEMINFO,
        )
    msg = str(info.value)
    print(msg)
    assert (
        "card 1 (Intel(R) Arc(TM) Pro B70 Graphics) is faulted: "
        "RAS counters cache_errors_uncorrectable=3, reset=1" in msg
    )
    answers: Answers = {NVIDIA_HEALTH: fx("nvidia-smi-health-faulted.txt"), NVIDIA_APPS: ""}
    with pytest.raises(
        AdmissionError,
        match=r"card 0 \(NVIDIA H100 80GB HBM3\) is faulted: "
        r"nvidia-smi reports \[GPU requires reset\]",
    ):
        admit(cuda_profile(), probe=probe_from(answers), meminfo=lambda: MEMINFO)


def test_admission_refuses_missing_cards_and_missing_or_denied_tools() -> None:
    with pytest.raises(AdmissionError, match=r"needs 4 xpu card\(s\) but 2 answer"):
        admit(lab_profile(count=4), probe=probe_from(xpu_answers()), meminfo=lambda: MEMINFO)
    with pytest.raises(
        AdmissionError, match=r"cannot check the xpu cards \(xpu-smi discovery: missing"
    ):
        admit(lab_profile(), probe=probe_from({}), meminfo=lambda: MEMINFO)
    denied: Answers = {NVIDIA_HEALTH: DENIED_NVIDIA, NVIDIA_APPS: DENIED_NVIDIA}
    with pytest.raises(
        AdmissionError,
        match=r"cannot check the cuda cards "
        r".*denied \(Failed to initialize NVML: Insufficient Permissions\)",
    ):
        admit(cuda_profile(), probe=probe_from(denied), meminfo=lambda: MEMINFO)


def test_admission_refuses_a_too_full_disk_and_too_little_memory(tmp_path: Path) -> None:
    profile = lab_profile(min_free_disk_gib=1e9, min_free_memory_gib=1e6)
    with pytest.raises(AdmissionError) as info:
        admit(profile, probe=probe_from(xpu_answers()), meminfo=lambda: MEMINFO, folders=[tmp_path])
    msg = str(info.value)
    print(msg)
    assert (
        f"free on the disk of {tmp_path}, under the floor of 1e+09 GiB "
        "(limits.min_free_disk_gib): free space first" in msg
    )
    assert (
        "238.6 GiB of host memory available, under the floor of 1e+06 GiB "
        "(limits.min_free_memory_gib)" in msg
    )


def test_admission_refuses_a_model_path_that_does_not_exist(tmp_path: Path) -> None:
    """Before: vLLM took the missing path for a hub repository id and failed ~30 s later
    with HFValidationError. Now admission refuses at once, naming the field."""
    p = lab_profile()
    missing = dataclasses.replace(
        p, model=dataclasses.replace(p.model, path=str(tmp_path / "nope"))
    )
    with pytest.raises(AdmissionError) as info:
        admit(missing, probe=probe_from(xpu_answers()), meminfo=lambda: MEMINFO)
    msg = str(info.value)
    assert f"model.path '{tmp_path / 'nope'}' does not exist (model.source = 'path')" in msg
    assert "HFValidationError" in msg and "Fix model.path" in msg


def test_the_cpu_default_is_admitted_without_any_card_tool(tmp_path: Path) -> None:
    cpu = load_profile(ROOT / "fixtures" / "profiles" / "cpu-smollm2.toml")
    r = admit(cpu, probe=probe_from({}), meminfo=lambda: MEMINFO, folders=[tmp_path])
    assert r.cards == () and r.tools == () and r.problems == ()


# ------------------------------------------------------------------- post-run and the record


def test_a_session_record_carries_both_receipts_each_stop_and_the_difference(
    tmp_path: Path,
) -> None:
    profile = lab_profile()
    results = SessionResults()
    admit_into(
        results.receipts,
        profile,
        probe=probe_from(xpu_answers()),
        meminfo=lambda: MEMINFO,
        folders=[tmp_path],
    )
    forced = StopRecord(profile.name, 777, "SIGTERM", False, 60.2, True, forced_allowed=False)
    results.stops[profile.name] = forced.to_dict()
    problems = post_run_into(
        results.receipts,
        [profile],
        {profile.name: forced},
        probe=probe_from(xpu_answers(stats1="xpu-smi-stats-faulted.json")),
        meminfo=lambda: MEMINFO.replace("250212948", "240212948"),
        folders=[tmp_path],
    )
    print("\n".join(problems))
    assert any("killed with SIGKILL, which its stop policy forbids" in p for p in problems)
    assert any(
        "card 1 counted new errors during the run: cache_errors_uncorrectable +3, reset +1" in p
        for p in problems
    )
    entry = results.receipts[profile.name]
    assert set(entry) == {"admission", "post_run", "difference"}
    assert entry["difference"]["mem_available_gib"] == pytest.approx(-10000000 / 2**20, abs=1e-3)
    assert entry["difference"]["cards"]["1"]["errors"]["reset"] == 1
    lab = SessionResults.from_dict(json.loads(json.dumps(results.to_dict()))).lab()
    assert lab["stops"][profile.name]["forced"] is True
    assert lab["receipts"][profile.name]["post_run"]["problems"] == problems
    merged = SessionResults.merge([results, SessionResults.from_dict(results.to_dict())])
    assert merged.receipts == results.receipts and merged.stops == results.stops


def test_a_refused_admission_is_kept_and_repeated(tmp_path: Path) -> None:
    book: dict[str, dict[str, object]] = {}
    answers = xpu_answers(ps="xpu-smi-ps-busy.json")
    for _ in range(2):
        with pytest.raises(AdmissionError, match="busy with another process"):
            admit_into(book, lab_profile(), probe=probe_from(answers), meminfo=lambda: MEMINFO)
    assert book[lab_profile().name]["admission"]["problems"]  # type: ignore[index]
    assert post_run_into(book, [lab_profile()], {}, probe=probe_from(answers)) == []
    post = receipt(lab_profile(), xpu_answers())
    assert difference(post, post)["cards"]["0"]["errors"]["reset"] == 0
