"""Exact-length prompts, with counters that stand in for a tokenizer (the real /tokenize is
exercised by every perf test against the real server)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest

from servelab import prompts
from servelab.errors import ClientError


def word_counter(
    bos: int = 1, double: frozenset[str] = frozenset({"information"})
) -> prompts.TokenCounter:
    """One token per word, two for the words in ``double``, plus ``bos`` special tokens."""

    def count(p: str | Sequence[Mapping[str, str]]) -> int:
        text = p if isinstance(p, str) else " ".join(m["content"] for m in p) + " <t> <t> <t>"
        return bos + sum(2 if w in double else 1 for w in text.split())

    return count


@pytest.mark.parametrize("n", [2, 3, 17, 32, 128, 500])
def test_exact_length(n: int) -> None:
    c = word_counter()
    text = prompts.exact_text(c, n, "salt")
    assert c(text) == n


def test_words_that_take_two_tokens_are_corrected() -> None:
    c = word_counter(double=frozenset(prompts.WORDS[::2]))  # half the vocabulary is 2 tokens
    for n in (5, 33, 64):
        for salt in range(5):
            assert c(prompts.exact_text(c, n, salt)) == n


def test_unique_per_salt_and_deterministic() -> None:
    c = word_counter()
    texts = [prompts.exact_text(c, 32, f"r{i}") for i in range(50)]
    assert len(set(texts)) == 50
    assert prompts.exact_text(c, 32, "r3") == texts[3]
    # Different salts differ from the very first words: no shared prefix-cache block.
    firsts = {" ".join(t.split()[:4]) for t in texts}
    assert len(firsts) == 50


def test_too_short_a_length_is_an_error() -> None:
    with pytest.raises(ClientError, match="exactly 1 tokens"):
        prompts.exact_text(word_counter(bos=1), 1, "s")
    with pytest.raises(ClientError, match="n_tokens must be >= 1"):
        prompts.exact_text(word_counter(), 0, "s")


def test_chat_messages_include_template_overhead() -> None:
    c = word_counter()
    from servelab.server import Endpoint

    ep = Endpoint(base_url="http://unused", model="m")
    msgs = prompts.exact_messages(ep, 40, "chat", count=c, system="Be brief.")
    assert msgs[0] == {"role": "system", "content": "Be brief."}
    assert c(msgs) == 40


def test_exact_prompts_rejects_duplicate_salts() -> None:
    from servelab.server import Endpoint

    ep = Endpoint(base_url="http://unused", model="m")
    with pytest.raises(ClientError, match="duplicate"):
        prompts.exact_prompts(ep, 8, ["a", "a"], count=word_counter())
    assert len(prompts.exact_prompts(ep, 8, ["a", "b"], count=word_counter())) == 2


def test_server_counter_reports_a_missing_tokenize_endpoint() -> None:
    from servelab.server import Endpoint, free_port

    ep = Endpoint(base_url=f"http://127.0.0.1:{free_port()}", model="m")  # nothing listens
    with pytest.raises(ClientError, match="tokenize request failed"):
        prompts.server_token_counter(ep, timeout_s=2)("x")


@pytest.mark.slow  # importing transformers takes ~10 s on 2 cores
def test_local_tokenizer_fallback_counts_like_the_model() -> None:
    """The real SmolLM2 tokenizer where servelab already prepared the model (else skipped)."""
    from servelab.models import default_cache_dir

    dirs = sorted(default_cache_dir().glob("models/smollm2-*/tokenizer.json"))
    if not dirs:
        pytest.skip("no prepared SmolLM2 model in the servelab cache (run a perf test first)")
    pytest.importorskip("transformers")
    count = prompts.hf_token_counter(str(dirs[0].parent))
    for n in (3, 32, 100):
        text = prompts.exact_text(count, n, f"hf{n}")
        assert count(text) == n
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    assert count(msgs) > count("What is the capital of France?")  # the chat template adds tokens


# --------------------------------------------------------------------------- local tokenizer
# An engine kind without /tokenize (transformers serve) is counted with the served model
# directory's own tokenizer (Endpoint.model_path), as that server tokenizes.


def _transformers_endpoint(model_path: object) -> object:
    from pathlib import Path

    from servelab.profiles import load_profile
    from servelab.server import Endpoint

    root = Path(__file__).resolve().parents[1]
    profile = load_profile(root / "fixtures" / "profiles" / "cpu-transformers-smollm2.toml")
    assert profile.engine.kind == "transformers"
    return Endpoint("http://127.0.0.1:9", "m", profile=profile, model_path=model_path)  # type: ignore[arg-type]


def test_an_engine_without_tokenize_counts_with_the_served_models_tokenizer(
    tmp_path: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []

    def fake_hf(model_dir: str) -> prompts.TokenCounter:
        seen.append(model_dir)
        return word_counter(bos=0)

    monkeypatch.setattr(prompts, "hf_token_counter", fake_hf)
    ep = _transformers_endpoint(tmp_path)
    count = prompts.server_token_counter(ep)  # type: ignore[arg-type]
    assert seen == [str(tmp_path)]  # no request to the server: nothing listens on port 9
    assert count("one two three") == 3
    # The workloads' Prompts take the same path: exact lengths without /tokenize.
    from servelab.workloads import Prompts

    texts = Prompts(ep, nonce="n").make(12, "decode", 2)  # type: ignore[arg-type]
    assert [count(t) for t in texts] == [12, 12]


def test_an_engine_without_tokenize_and_without_a_model_directory_says_what_to_do(
    tmp_path: pytest.TempPathFactory,
) -> None:
    for where in (None, tmp_path / "missing"):  # type: ignore[operator]
        with pytest.raises(ClientError, match=r"no /tokenize.*no model directory"):
            prompts.server_token_counter(_transformers_endpoint(where))  # type: ignore[arg-type]


def _tiny_tokenizer_dir(root: object) -> object:
    """A word-level tokenizer with a chat template, saved as a model directory would hold it."""
    import json
    from pathlib import Path

    from tokenizers import Tokenizer, models, pre_tokenizers

    d = Path(str(root))
    vocab = {w: i for i, w in enumerate(["<unk>", "S", "user", "assistant", "a", "b", "c"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(d / "tokenizer.json"))
    template = (
        "{% for m in messages %}S {{ m['role'] }} {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}S assistant {% endif %}"
    )
    (d / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "unk_token": "<unk>",
                "chat_template": template,
            }
        )
    )
    return d


@pytest.mark.slow  # importing transformers takes ~10 s on 2 cores
def test_the_local_counter_counts_prompts_and_templated_chat_exactly(
    tmp_path: pytest.TempPathFactory,
) -> None:
    d = _tiny_tokenizer_dir(tmp_path)
    count = prompts.hf_token_counter(str(d))
    assert count("a b c c") == 4  # a completions prompt: its tokens, nothing added
    # Chat: the template and the generation prompt count ("S user a b S assistant").
    assert count([{"role": "user", "content": "a b"}]) == 6
    text = prompts.exact_text(count, 9, "tiny")
    assert count(text) == 9


@pytest.mark.slow  # importing transformers takes ~10 s on 2 cores
def test_a_model_directory_without_a_tokenizer_is_a_client_error(
    tmp_path: pytest.TempPathFactory,
) -> None:
    with pytest.raises(ClientError, match="no tokenizer to count prompt tokens"):
        prompts.hf_token_counter(str(tmp_path))
