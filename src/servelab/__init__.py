"""servelab: a pytest-centric performance regression suite for self-hosted LLM serving."""

from __future__ import annotations

__version__ = "0.1.0"
