"""Keep secrets out of records, log copies, reports and the terminal.

Secrets are found by where they come from, never by broad patterns that would also match
ordinary settings (`max_num_batched_tokens=8192`, `tokenizer=/path`, `TOKENIZERS_PARALLELISM`,
`XDG_SESSION_CLASS=user`):

- the API key the user gave (`--api-key`, `SERVELAB_API_KEY`);
- variables that hold credentials by name (`HF_TOKEN`, `OPENAI_API_KEY`, ...), and variables
  named `*_TOKEN`, `*_API_KEY`, `*_SECRET`, `*_PASSWORD` whose value looks like a credential
  (one word, at least `MIN_GUESSED_LEN` characters, letters with digits or mixed case);
- credential headers (`Authorization`, `X-Api-Key`, cookies);
- in text, `--api-key VALUE` / `--hf-token VALUE`, `Bearer TOKEN`, `NAME=VALUE` for the names
  above, and the password of a URL's user info.

Every value found that way is then scrubbed from text wherever it appears. Nothing else is
touched: a redacted record differs from the original only where a secret was.

`Secret` and `SecretHeaders` keep the key out of what servelab prints: their repr shows
`***`, so a failure traceback that shows a fixture or an argument holding them does not leak it.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

MASK = "***redacted***"
SHOWN = "***"

#: Variables that hold a credential whatever their value looks like.
KNOWN_SECRET_VARS = frozenset(
    {
        "API_KEY",
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HUGGINGFACE_HUB_TOKEN",
        "OPENAI_API_KEY",
        "VLLM_API_KEY",
        "SERVELAB_API_KEY",
    }
)
#: Headers that carry credentials (compared lower-case).
SECRET_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key", "api-key"}
)
# A name that may hold a credential: one of these words, or ending in KEY after API/ACCESS/...
_SECRET_WORDS = frozenset(
    {"TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "CREDENTIALS", "AUTH", "APIKEY"}
)
_KEY_QUALIFIERS = frozenset({"API", "ACCESS", "SECRET", "PRIVATE", "AUTH"})
# `NAME=VALUE` in text: only upper-case environment-style names ending in a credential word.
_GUESSED_VAR = r"[A-Z][A-Z0-9_]*_(?:TOKEN|API_KEY|SECRET|PASSWORD|PASSWD)"
_KNOWN_VAR = "|".join(sorted(KNOWN_SECRET_VARS, key=len, reverse=True))
_ASSIGNMENT = re.compile(rf"(?<![A-Za-z0-9_])({_KNOWN_VAR}|{_GUESSED_VAR})=([^\s'\",;]+)")
_BEARER = re.compile(r"(?i)(?<![A-Za-z0-9_])(bearer\s+)([A-Za-z0-9._~+/=-]{4,})")
_SECRET_ARG = re.compile(r"(--(?:api[-_]key|hf[-_]token)(?:=|\s+))(?!\*\*\*)(\S+)")
_URL_PASSWORD = re.compile(r"(https?://[^/\s:@]+:)([^@\s/]+)(@)")
_CREDENTIAL_VALUE = re.compile(r"[A-Za-z0-9._~+/=:-]+")
_AUTH_SCHEMES = frozenset({"bearer", "basic", "token", "digest", "apikey"})

#: Keys of servelab's own records that contain "key" but hold no secret.
SAFE_KEYS = frozenset({"key", "host_key", "figure_key", "keys"})
#: A value guessed to be a credential (by its variable's name) must be at least this long.
MIN_GUESSED_LEN = 16
#: A secret shorter than this is not scrubbed by value (it would mangle ordinary text); it is
#: still masked where it comes from (its variable, header or `--api-key`).
MIN_SCRUB_LEN = 8


# --------------------------------------------------------------------------- what is secret


def is_secret_name(name: str) -> bool:
    """Whether a variable or header name may hold a credential (`HF_TOKEN`, `DB_PASSWORD`,
    `aws_secret_access_key`, `Authorization`); not `TOKENIZERS_PARALLELISM` or
    `XDG_SESSION_CLASS`."""
    if name.upper() in KNOWN_SECRET_VARS or name.lower() in SECRET_HEADERS:
        return True
    words = [w for w in re.split(r"[^A-Za-z0-9]+", name.upper()) if w]
    if any(w in _SECRET_WORDS or w == "AUTHORIZATION" for w in words):
        return True
    return len(words) >= 2 and words[-1] == "KEY" and words[-2] in _KEY_QUALIFIERS


def looks_like_credential(value: str) -> bool:
    """One long word of letters with digits or mixed case: `hf_...`, `sk-...`, `ghp_...`;
    not a path, a number, a boolean, a list or a sentence."""
    if len(value) < MIN_GUESSED_LEN or not _CREDENTIAL_VALUE.fullmatch(value):
        return False
    if value.startswith(("/", "~", ".", "http:", "https:")):
        return False
    letters = [c for c in value if c.isalpha()]
    if not letters:
        return False
    has_digit = any(c.isdigit() for c in value)
    mixed_case = any(c.islower() for c in letters) and any(c.isupper() for c in letters)
    return has_digit or mixed_case


def is_secret(name: str, value: str) -> bool:
    """Whether `name=value` (a variable or a header) holds a credential."""
    if not value:
        return False
    if name.upper() in KNOWN_SECRET_VARS or name.lower() in SECRET_HEADERS:
        return True
    return is_secret_name(name) and looks_like_credential(value)


def redact_env(env: Mapping[str, str]) -> dict[str, str]:
    return {k: (MASK if is_secret(k, v) else v) for k, v in env.items()}


def redact_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {k: (MASK if is_secret(k, v) else v) for k, v in headers.items()}


# --------------------------------------------------------------------------- holders


class Secret:
    """A secret string that does not show itself: `repr`/`str` give `***`.

    `reveal()` gives the value, to be called only where it is sent (a header).
    """

    __slots__ = ("_value",)

    def __init__(self, value: str | Secret) -> None:
        if isinstance(value, Secret):
            value = value.reveal()
        self._value = str(value)

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret({SHOWN!r})"

    def __str__(self) -> str:
        return SHOWN

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash((Secret, self._value))

    def __reduce__(self) -> tuple[type[Secret], tuple[str]]:
        return (Secret, (self._value,))


def reveal(value: Secret | str | None) -> str | None:
    """The plain value of a `Secret` (or of a plain string, unchanged)."""
    return value.reveal() if isinstance(value, Secret) else value


class SecretHeaders(Mapping[str, str]):
    """Request headers (a real `Mapping[str, str]`: httpx takes it as it is) whose repr
    masks credential headers (`Authorization`, ...)."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, str] | Iterable[tuple[str, str]] = ()) -> None:
        pairs = items.items() if isinstance(items, Mapping) else items
        self._items: dict[str, str] = {str(k): reveal(v) or "" for k, v in pairs}

    @classmethod
    def bearer(cls, api_key: Secret | str | None) -> SecretHeaders:
        """`Authorization: Bearer KEY`, or no header without a key."""
        key = reveal(api_key)
        return cls({"Authorization": f"Bearer {key}"} if key else {})

    def __getitem__(self, name: str) -> str:
        return self._items[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        shown = {k: (SHOWN if is_secret(k, v) else v) for k, v in self._items.items()}
        return f"SecretHeaders({shown!r})"

    def __reduce__(self) -> tuple[type[SecretHeaders], tuple[dict[str, str]]]:
        return (SecretHeaders, (dict(self._items),))


# --------------------------------------------------------------------------- scrubbing


@dataclass(frozen=True)
class Redactor:
    """Scrubs known secret values, and secrets at the places they are written, from text and
    nested data. Its repr does not show the secrets it holds."""

    secrets: frozenset[str] = field(repr=False)

    @classmethod
    def from_sources(
        cls,
        *,
        environ: Mapping[str, str] | None = None,
        envs: Iterable[Mapping[str, str]] = (),
        headers: Iterable[Mapping[str, str]] = (),
        values: Iterable[Secret | str | None] = (),
    ) -> Redactor:
        """`environ`/`envs`: environments (the process's, the profiles'); `headers`: request
        headers sent; `values`: secrets given outright (the API key)."""
        found: set[str] = set()
        for env in [environ or {}, *envs]:
            found.update(v for k, v in env.items() if is_secret(k, v))
        for h in headers:
            for k, v in h.items():
                if is_secret(k, v):
                    # "Bearer abc": the token goes, the scheme stays readable.
                    found.update(part for part in v.split() if part.lower() not in _AUTH_SCHEMES)
        found.update(v for v in (reveal(x) for x in values) if v)
        return cls(frozenset(s for s in found if len(s) >= MIN_SCRUB_LEN))

    def __repr__(self) -> str:
        return f"Redactor({len(self.secrets)} secret(s))"

    def text(self, s: str) -> str:
        # Longest first, so a secret that contains another is removed whole.
        for secret in sorted(self.secrets, key=len, reverse=True):
            s = s.replace(secret, MASK)
        s = _SECRET_ARG.sub(lambda m: m.group(1) + MASK, s)
        s = _BEARER.sub(lambda m: m.group(1) + MASK, s)
        s = _URL_PASSWORD.sub(lambda m: m.group(1) + MASK + m.group(3), s)
        return _ASSIGNMENT.sub(self._assignment, s)

    @staticmethod
    def _assignment(m: re.Match[str]) -> str:
        name, value = m.group(1), m.group(2)
        return f"{name}={MASK}" if value != MASK and is_secret(name, value) else m.group(0)

    def data(self, obj: Any) -> Any:
        """A copy of JSON-like data with credential entries masked and secret values scrubbed."""
        if isinstance(obj, Mapping):
            out = {}
            for k, v in obj.items():
                key = str(k)
                if isinstance(v, str) and key not in SAFE_KEYS and is_secret(key, v):
                    out[key] = MASK
                else:
                    out[key] = self.data(v)
            return out
        if isinstance(obj, (list, tuple)):
            return [self.data(v) for v in obj]
        if isinstance(obj, str):
            return self.text(obj)
        return obj
