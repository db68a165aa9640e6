"""Prompts of an exact token length, unique per request.

Lengths are counted by the served model's tokenizer: the server's ``/tokenize`` where it
exists (vLLM's or llama.cpp's dialect, `servelab.engine_traits`), otherwise a local counter
(`hf_token_counter`). Each prompt is a sequence of
common words drawn from a generator seeded by its ``salt``, so two salts share no prefix
beyond a chance word or two: no prefix-cache block can be reused between measured requests.
Warm-up prompts use their own salts and therefore never share a prefix with measured ones.

The length is reached by counting, adding or removing words, and counting again, so it is
exact for the tokenizer that counts (including any special tokens the server adds).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import httpx
import numpy as np

from servelab.errors import ClientError
from servelab.server import Endpoint

#: Counts the tokens of a completions prompt (str) or of chat messages (list of dicts).
TokenCounter = Callable[[str | Sequence[Mapping[str, str]]], int]

# Common lower-case words; with a leading space each is one token in the BPE vocabularies
# of the models servelab serves (the counting loop corrects any that are not).
_WORD_TEXT = """
    time year people way day man thing woman life child world school state family student
    group country problem hand part place case week company system program question work
    government number night point home water room mother area money story fact month lot
    right study book eye job word business issue side kind head house service friend father
    power hour game line end member law car city community name president team minute idea
    kid body information back parent face others level office door health person art war
    history party result change morning reason research girl guy moment air teacher force
    education foot boy age policy music market sense nation plan college interest death
    experience effect class control care field development role effort rate heart drug show
    leader light voice wife police mind price report decision son view relationship town road
    arm difference value building action model season society tax director position player
    record paper space ground form event official matter center couple site project activity
    star table need court oil situation cost industry figure street image phone data picture
    practice piece land product doctor wall patient worker news test movie north love support
    technology step baby computer type attention film tree source organization hair window
    evidence population site army camera river garden letter wind stone bird horse summer
    winter spring autumn bread apple orange green blue yellow silver gold paper glass metal
"""
WORDS: tuple[str, ...] = tuple(dict.fromkeys(_WORD_TEXT.split()))
MAX_ADJUST_ROUNDS = 12
MAX_CANDIDATES = 40


def salt_rng(salt: str | int) -> np.random.Generator:
    """A generator seeded from any salt (stable across processes and Python versions)."""
    digest = hashlib.sha256(str(salt).encode("utf-8")).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _words(rng: np.random.Generator, n: int) -> list[str]:
    return [WORDS[i] for i in rng.integers(0, len(WORDS), size=n)]


def server_token_counter(
    endpoint: Endpoint, *, http: httpx.Client | None = None, timeout_s: float = 60.0
) -> TokenCounter:
    """Count tokens as the server counts them: its ``/tokenize`` in its engine's dialect
    (vLLM, llama.cpp), or, for an engine kind without one (``transformers serve``), the
    served model's own tokenizer read from ``endpoint.model_path``; ClientError if neither.

    For chat messages the count includes the chat template and the generation prompt,
    exactly what the server will see.
    """
    from servelab.engine_traits import traits_of

    dialect = traits_of(endpoint.profile).tokenize
    base = endpoint.base_url.rstrip("/")
    url = base + "/tokenize"
    headers = dict(endpoint.headers)
    if dialect is None:
        kind = endpoint.profile.engine.kind if endpoint.profile else "?"
        if endpoint.model_path is not None and endpoint.model_path.is_dir():
            return hf_token_counter(str(endpoint.model_path))
        raise ClientError(
            f"{url}: engine kind {kind!r} has no /tokenize and the endpoint names no model "
            f"directory with a tokenizer (model_path {endpoint.model_path}): serve a prepared "
            "model directory, or pass a local counter (prompts.hf_token_counter(model_dir))"
        )

    def post(target: str, body: dict[str, Any]) -> Any:
        try:
            if http is not None:
                r = http.post(target, json=body, headers=headers)
            else:
                r = httpx.post(
                    target, json=body, headers=headers, timeout=timeout_s, trust_env=False
                )
        except httpx.HTTPError as exc:
            raise ClientError(f"{target}: tokenize request failed: {exc}") from exc
        if r.status_code != 200:
            raise ClientError(
                f"{target}: HTTP {r.status_code} ({r.text[:200]!r}); this server has no usable "
                "/tokenize: pass a local counter (prompts.hf_token_counter(model_dir))"
            )
        return r.json()

    def count(prompt: str | Sequence[Mapping[str, str]]) -> int:
        if dialect == "llama.cpp":
            # What llama-server feeds the model: the chat template applied (/apply-template),
            # then the text tokenized with special tokens added and parsed.
            text: object = prompt
            if not isinstance(prompt, str):
                templated = post(base + "/apply-template", {"messages": [dict(m) for m in prompt]})
                text = templated.get("prompt") if isinstance(templated, dict) else None
                if not isinstance(text, str):
                    raise ClientError(
                        f"{base}/apply-template: answer has no 'prompt': {templated!r}"
                    )
            data = post(url, {"content": text, "add_special": True, "parse_special": True})
        else:
            body: dict[str, Any] = {"model": endpoint.model}
            if isinstance(prompt, str):
                body["prompt"] = prompt
            else:
                body["messages"] = [dict(m) for m in prompt]
                body["add_generation_prompt"] = True
            data = post(url, body)
        n = data.get("count") if isinstance(data, dict) else None
        if not isinstance(n, int):
            tokens = data.get("tokens") if isinstance(data, dict) else None
            if not isinstance(tokens, list):
                raise ClientError(f"{url}: answer has neither 'count' nor 'tokens': {data!r}")
            n = len(tokens)
        return n

    return count


def hf_token_counter(model_dir: str) -> TokenCounter:
    """Count tokens with the model's own tokenizer (transformers), as the server would:
    ``transformers serve`` tokenizes a completions prompt with ``tokenizer(prompt)`` and chat
    messages with ``apply_chat_template(..., add_generation_prompt=True)``, as here."""
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:  # pragma: no cover - transformers comes with vLLM
        raise ClientError(
            "counting tokens locally needs transformers; install it or use a server with /tokenize"
        ) from exc
    try:
        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ClientError(
            f"{model_dir}: no tokenizer to count prompt tokens with ({exc}); the model "
            "directory must hold the tokenizer the server uses (servelab prepare-model writes it)"
        ) from exc

    def count(prompt: str | Sequence[Mapping[str, str]]) -> int:
        if isinstance(prompt, str):
            return len(tok(prompt)["input_ids"])
        ids = tok.apply_chat_template(
            [dict(m) for m in prompt], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, Mapping):  # newer transformers return a BatchEncoding
            ids = ids["input_ids"]
        return len(ids)

    return count


def endpoint_token_counter(endpoint: Endpoint, model_dir: str | None = None) -> TokenCounter:
    """The server's ``/tokenize`` if it answers, else the local tokenizer in ``model_dir``."""
    counter = server_token_counter(endpoint)
    try:
        counter("probe")
    except ClientError:
        if model_dir is None:
            raise
        return hf_token_counter(model_dir)
    return counter


def exact_text(
    count: Callable[[str], int],
    n_tokens: int,
    salt: str | int,
    *,
    wrap: Callable[[str], Any] | None = None,
) -> str:
    """Words seeded by ``salt`` whose token count (of ``wrap(text)``, if given) is ``n_tokens``.

    Raises ClientError when the length cannot be reached (e.g. ``n_tokens`` below the
    fixed overhead of the template or special tokens).
    """
    if n_tokens < 1:
        raise ClientError(f"exact prompt: n_tokens must be >= 1 (got {n_tokens})")
    rng = salt_rng(salt)
    pool = _words(rng, 2 * n_tokens + 16)
    k = min(len(pool), n_tokens)
    seen: dict[int, int] = {}

    def measure(k: int) -> int:
        if k not in seen:
            text = " ".join(pool[:k])
            seen[k] = count(text) if wrap is None else count(wrap(text))
        return seen[k]

    for _ in range(MAX_ADJUST_ROUNDS):
        got = measure(k)
        if got == n_tokens:
            return " ".join(pool[:k])
        step = n_tokens - got
        nk = max(1, min(len(pool), k + step))
        if nk == k:
            break
        if nk in seen:  # oscillating between two counts: walk one word at a time
            nk = k + (1 if step > 0 else -1)
            if nk < 1 or nk > len(pool) or nk in seen:
                break
        k = nk
    # Prefix lengths jump over n_tokens (multi-token words at the cut): from the longest
    # prefix below it, append single candidate words greedily until the count is exact.
    below = [j for j, c in seen.items() if c < n_tokens]
    if below:
        base = pool[: max(below)]
        order = [WORDS[i] for i in rng.permutation(len(WORDS))[:MAX_CANDIDATES]]
        for w in order:
            text = " ".join([*base, w])
            got = count(text) if wrap is None else count(wrap(text))
            if got == n_tokens:
                return text
            if got < n_tokens:
                base.append(w)
    raise ClientError(
        f"exact prompt: could not build a prompt of exactly {n_tokens} tokens "
        f"(word counts tried: {dict(sorted(seen.items()))}); the minimum here may be larger "
        "(special tokens, chat template): ask for a longer prompt"
    )


def exact_prompt(
    endpoint: Endpoint,
    n_tokens: int,
    salt: str | int,
    *,
    count: TokenCounter | None = None,
) -> str:
    """A completions prompt of exactly ``n_tokens`` tokens as the server counts them.

    ``salt`` makes it unique: use a different salt for every request (and for warm-ups).
    """
    counter = count or server_token_counter(endpoint)
    return exact_text(counter, n_tokens, salt)


def exact_messages(
    endpoint: Endpoint,
    n_tokens: int,
    salt: str | int,
    *,
    count: TokenCounter | None = None,
    system: str | None = None,
) -> list[dict[str, str]]:
    """Chat messages whose templated prompt (with generation prompt) is ``n_tokens`` long."""
    counter = count or server_token_counter(endpoint)

    def wrap(text: str) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": system}] if system else []
        return [*msgs, {"role": "user", "content": text}]

    return wrap(exact_text(counter, n_tokens, salt, wrap=wrap))


def exact_prompts(
    endpoint: Endpoint,
    n_tokens: int,
    salts: Sequence[str | int],
    *,
    count: TokenCounter | None = None,
) -> list[str]:
    """One exact-length prompt per salt; fails if two salts gave the same text."""
    counter = count or server_token_counter(endpoint)
    texts = [exact_text(counter, n_tokens, s) for s in salts]
    if len(set(texts)) != len(texts):
        raise ClientError(
            f"exact prompts: salts {list(salts)} produced duplicate prompts; use distinct salts"
        )
    return texts
