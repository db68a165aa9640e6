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
