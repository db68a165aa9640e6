"""What each engine kind offers beyond the OpenAI API, so no workload assumes vLLM.

A profile's ``engine.kind`` names the protocol family (``vllm``, ``llama.cpp``,
``transformers``); its traits say how prompts are counted exactly, which ``/metrics``
dialect the engine exports (mapped onto servelab's names by `servelab.prometheus`), whether
an output length can be forced (``ignore_eos``), and which per-chunk extras it streams, and
how the server departs from the OpenAI wire format (model pinned to its path, no
``/v1/models``, no ``[DONE]``). `EngineTraits.figure_notes` is what every figure from an
engine that could not force its output length (or has no /metrics or /tokenize) must say.

Measured (llama.cpp b-series server in the llama-cpp-python 0.3.36 sdist; transformers 5.17
and 5.19 ``transformers serve``; vLLM 0.32 CPU): see docs/engines.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from servelab.profiles import EngineKind, Profile

TokenizeDialect = Literal["vllm", "llama.cpp"]
MetricsDialect = Literal["vllm", "llama.cpp"]


@dataclass(frozen=True)
class EngineTraits:
    kind: str
    # How the server counts a prompt (POST /tokenize); None: count with the local tokenizer.
    tokenize: TokenizeDialect | None
    # The /metrics dialect; None: the engine exports none (figures from it are "not available").
    metrics: MetricsDialect | None
    # `ignore_eos` forces every output to max_tokens; False: output lengths vary, and the
    # figures say so.
    ignore_eos: bool
    # vLLM's `return_token_ids` (exact per-chunk token counts); else one token per chunk
    # is assumed and checked against usage.
    token_ids: bool
    # GET path that names the engine's version (None: none).
    version_path: str | None
    # Connections may be reused. llama-server (cpp-httplib) closed a kept connection after a
    # streamed response, unannounced, in 2-9 of 15-45 back-to-back requests (2026-12-06): the
    # next request on it failed "Server disconnected without sending a response". For it the
    # client opens a connection per request (TTFT then includes a localhost TCP connect).
    keep_alive: bool = True
    # Body fields every measured request carries (llama.cpp: no reuse of a slot's cached
    # prompt, which would serve a chance common first word of two prompts from cache).
    measured_extra: tuple[tuple[str, object], ...] = ()
    # The server answers only to the model path it was started with: `transformers serve
    # PATH` refuses any other `model` ("Server is pinned to 'PATH'", HTTP 400) and has no
    # --served-model-name, so requests name that path (the record keeps served_name).
    model_is_path: bool = False
    # GET /v1/models lists the served model. transformers serve lists the Hugging Face hub
    # cache instead (HTTP 500 where there is none, 2026-12-06): readiness then goes straight
    # to the 1-token completion, which shows the served model answering.
    lists_models: bool = True
    # A stream ends with `data: [DONE]`. transformers serve ends it after the chunk with
    # finish_reason and usage and sends none: there a stream is complete when its body ends
    # after a finish_reason (`servelab.client`).
    done_marker: bool = True
    # Whether the engine serves a repeated prompt prefix from a cache, where /metrics cannot
    # say (None: read it from /metrics, `servelab.session_cache.reuses_cache`). transformers
    # serve with --continuous-batching shares whole KV blocks between prompts with a common
    # prefix (ContinuousBatchingConfig.allow_block_sharing, on by default, no CLI flag): a
    # 32-token prompt sent again came back 18 % faster (2026-12-06), and it reports no hit.
    prefix_cache: bool | None = None
    # A prompt served from the prefix cache gives the same tokens as one computed afresh.
    # llama.cpp's server documents the opposite for `cache_prompt`: "depending on the
    # backend, the logits are not guaranteed to be bit-for-bit identical for different batch
    # sizes (prompt processing vs. token generation)". Seen on an H100 (2026-12-06): a reload
    # pass answered ' "violet".' where the cold pass answered ' violet.'. Where False, an
    # output that changes between passes is a labeled note, not a failure, and so is a
    # reload recall miss only the margin explains (`session_cache`: right cold, no other
    # session's word, another session right in the pass).
    cache_exact: bool = True

    def describe(self) -> str:
        return (
            f"engine kind {self.kind}: tokenize {self.tokenize or 'local tokenizer'}; "
            f"/metrics {self.metrics or 'not available'}; "
            "output length "
            + ("forced (ignore_eos)" if self.ignore_eos else "varies (no ignore_eos)")
        )

    def figure_notes(self) -> tuple[str, ...]:
        """What every figure measured on this engine must say about how it was measured
        (none for an engine that forces lengths and exports /metrics)."""
        notes: list[str] = []
        if not self.ignore_eos:
            notes.append(
                f"output lengths varied: engine kind {self.kind} has no ignore_eos, so each "
                "request ran to EOS or max_tokens"
            )
        if self.metrics is None:
            notes.append(f"server /metrics not available (engine kind {self.kind})")
        if self.tokenize is None:
            notes.append(
                f"prompt lengths counted by the served model's own tokenizer, locally (engine "
                f"kind {self.kind} has no /tokenize)"
            )
        return tuple(notes)


TRAITS: dict[str, EngineTraits] = {
    "vllm": EngineTraits("vllm", "vllm", "vllm", True, True, "/version"),
    # llama-server: /tokenize {"content"} -> {"tokens"}; /apply-template for chat; --metrics
    # exports llamacpp:*; accepts ignore_eos; no return_token_ids.
    "llama.cpp": EngineTraits(
        "llama.cpp",
        "llama.cpp",
        "llama.cpp",
        True,
        False,
        "/props",
        keep_alive=False,
        measured_extra=(("cache_prompt", False),),
        cache_exact=False,
    ),
    # transformers serve: no /tokenize, no /metrics, rejects ignore_eos (HTTP 422
    # "Unexpected fields"); requests must name the model path it was started with.
    "transformers": EngineTraits(
        "transformers",
        None,
        None,
        False,
        False,
        None,
        model_is_path=True,
        lists_models=False,
        done_marker=False,
        prefix_cache=True,
    ),
}


def traits_of(profile: Profile | None) -> EngineTraits:
    """The traits of a profile's engine; an external endpoint is assumed to speak vLLM's
    dialect (what `servelab.engine.remote_engine` probes)."""
    kind: EngineKind = "vllm" if profile is None else profile.engine.kind
    return TRAITS[kind]
