"""Keep secrets out of records, log copies and reports.

Two layers: by name (an environment variable or header whose name looks like a credential has
its value replaced), and by value (every secret value found that way, plus the API key, is
scrubbed from any text that is about to be written, wherever it appears: command lines, log
lines, URLs).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

MASK = "***redacted***"
_SECRET_NAME = re.compile(
    r"TOKEN|KEY|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH|COOKIE|SESSION", re.IGNORECASE
)
_SECRET_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key", "api-key"}
)
# Patterns that are secrets whatever their context.
_PATTERNS = (
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]{4,}"),
    re.compile(r"(?i)(--api-key[= ]\s*)\S+"),
    re.compile(r"(?i)(\b[A-Z0-9_]*(?:TOKEN|SECRET|PASSWORD|API_KEY)[A-Z0-9_]*=)\S+"),
    re.compile(r"(https?://[^/\s:@]+:)[^@\s/]+(@)"),
)
_AUTH_SCHEMES = frozenset({"bearer", "basic", "token", "digest", "apikey"})
#: Keys of servelab's own records that contain "key" but hold no secret.
SAFE_KEYS = frozenset({"key", "host_key", "figure_key", "keys"})
#: Values shorter than this are not scrubbed by value (they would mangle ordinary text).
MIN_SECRET_LEN = 4


def is_secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(name))


def redact_env(env: Mapping[str, str]) -> dict[str, str]:
    return {k: (MASK if is_secret_name(k) else v) for k, v in env.items()}


def redact_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {
        k: (MASK if k.lower() in _SECRET_HEADERS or is_secret_name(k) else v)
        for k, v in headers.items()
    }


@dataclass(frozen=True)
class Redactor:
    """Scrubs known secret values and secret-looking patterns from text and nested data."""

    secrets: frozenset[str]

    @classmethod
    def from_sources(
        cls,
        *,
        environ: Mapping[str, str] | None = None,
        envs: Iterable[Mapping[str, str]] = (),
        headers: Iterable[Mapping[str, str]] = (),
        values: Iterable[str | None] = (),
    ) -> Redactor:
        found: set[str] = set()
        for env in [environ or {}, *envs]:
            found.update(v for k, v in env.items() if is_secret_name(k))
        for h in headers:
            for k, v in h.items():
                if k.lower() in _SECRET_HEADERS or is_secret_name(k):
                    found.add(v)
                    # "Bearer abc": the token alone must go too.
                    found.update(part for part in v.split() if part.lower() not in _AUTH_SCHEMES)
        found.update(v for v in values if v)
        return cls(frozenset(s for s in found if len(s) >= MIN_SECRET_LEN))

    def text(self, s: str) -> str:
        # Longest first, so a secret that contains another is removed whole.
        for secret in sorted(self.secrets, key=len, reverse=True):
            s = s.replace(secret, MASK)
        for pat in _PATTERNS:
            s = pat.sub(lambda m: m.group(1) + MASK + (m.group(2) if m.lastindex == 2 else ""), s)
        return s

    def data(self, obj: Any) -> Any:
        """A copy of JSON-like data with secret-named keys masked and secret values scrubbed."""
        if isinstance(obj, Mapping):
            out = {}
            for k, v in obj.items():
                key = str(k)
                secret_key = key not in SAFE_KEYS and (
                    is_secret_name(key) or key.lower() in _SECRET_HEADERS
                )
                if isinstance(v, str) and secret_key:
                    out[key] = MASK
                else:
                    out[key] = self.data(v)
            return out
        if isinstance(obj, (list, tuple)):
            return [self.data(v) for v in obj]
        if isinstance(obj, str):
            return self.text(obj)
        return obj
