"""The human side of a record: the lab's community result row and `record.md`'s tables.

The community row follows the lab's "Suggested Result Format" (Model ... Artifacts) with two
more fields the lab asks for beside tok/s: TTFT, and accepted tok/s when speculative decoding
is on. Every number in it carries its label (metric, shape, warm/cold, runs), and the notes
say what is specific to this run, read from the server's own command line.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from servelab.figures import Figure
from servelab.hardware import HostIdentity, StackIdentity

if TYPE_CHECKING:
    from servelab.record_build import TargetInfo
    from servelab.session import SessionInfo
    from servelab.target import Target

COMMUNITY_FIELDS = (
    "Model",
    "Quantization",
    "Hardware",
    "OS/kernel",
    "Engine/backend",
    "Recipe or commit",
    "Prompt/output/context",
    "Batch/concurrency",
    "Quality check",
    "Output tok/s",
    "Total tok/s",
    "TTFT",
    "Accepted tok/s",
    "Notes",
    "Artifacts",
)
#: Server arguments that turn speculative decoding on (vLLM; llama.cpp's draft model).
SPECULATIVE_FLAGS = (
    "--speculative-config",
    "--speculative_config",
    "--speculative-model",
    "--num-speculative-tokens",
    "--model-draft",
    "-md",
)
ACCEPTED = "vllm:spec_decode_num_accepted_tokens_total"
DRAFTED = "vllm:spec_decode_num_draft_tokens_total"
GENERATED = "vllm:generation_tokens_total"


def is_rate(fig: Figure) -> bool:
    return "tok/s" in fig.unit and "prefill" not in fig.metric


def is_total_rate(fig: Figure) -> bool:
    return is_rate(fig) and "total" in fig.metric


def is_accepted_rate(fig: Figure) -> bool:
    return is_rate(fig) and "accepted" in fig.metric


def is_ttft(fig: Figure) -> bool:
    return "ttft" in fig.metric and fig.unit in ("ms", "s")


def _short(fig: Figure) -> str:
    v = fig.value
    shown = "n/a" if v is None else f"{v:.4g}"
    state = "warm" if fig.warm else "cold"
    return f"{shown} {fig.unit} [{fig.metric}; {fig.shape.describe()}; {state}; n={len(fig.runs)}]"


# --------------------------------------------------------------------------- community row


def community_row(
    target: TargetInfo | Target,
    host: HostIdentity,
    session: SessionInfo,
    figures: Sequence[Figure],
    artifacts: Sequence[str],
    *,
    metrics: Mapping[str, Any] | None = None,
    requests: Sequence[Mapping[str, Any]] = (),
) -> dict[str, str]:
    """The community row of one target. `metrics`: its /metrics deltas by pytest node id
    (for the accepted tokens of speculative decoding); `requests`: the raw request rows (for
    whether output lengths were forced)."""
    shapes = sorted({f.shape.describe().rsplit(", c", 1)[0] for f in figures})
    concs = sorted({f.shape.concurrency for f in figures})
    out_rates = [
        _short(f)
        for f in figures
        if is_rate(f) and not is_total_rate(f) and not is_accepted_rate(f)
    ]
    tot_rates = [_short(f) for f in figures if is_total_rate(f)]
    ttfts = [_short(f) for f in figures if is_ttft(f)]
    if session.invalid_reasons:
        quality = "FAILED (no speed verdict): " + "; ".join(session.invalid_reasons)
    elif session.quality_checks:
        quality = "; ".join(session.quality_checks)
    else:
        quality = "not checked"
    stack = target.stack
    engine = target.engine
    if stack is not None and stack.engine_commit:
        engine += f" (commit {stack.engine_commit})"
    if stack is not None and stack.patches:
        engine += "; patches " + ", ".join(f"{f} sha256:{h[:12]}" for f, h in stack.patches)
    recipe = f"servelab {session.servelab_commit}: {session.command}"
    if stack is not None and stack.command:
        recipe += " | server: " + " ".join(stack.command)
    notes = [*target.notes, *run_notes(stack, figures, requests)]
    if session.interrupted:
        notes.insert(0, "session interrupted: partial record of the tests that finished")
    return {
        "Model": target.model,
        "Quantization": target.quantization or "unknown",
        "Hardware": host.describe_hardware(),
        "OS/kernel": f"{host.os}; kernel {host.kernel}; accelerator driver {host.drivers()}",
        "Engine/backend": engine,
        "Recipe or commit": recipe,
        "Prompt/output/context": "; ".join(shapes) or "n/a",
        "Batch/concurrency": ", ".join(f"c{c}" for c in concs) or "n/a",
        "Quality check": quality,
        "Output tok/s": "; ".join(out_rates) or "not measured",
        "Total tok/s": "; ".join(tot_rates)
        or "not measured (no figure of prompt + output tokens per second in this session)",
        "TTFT": "; ".join(ttfts) or "not measured",
        "Accepted tok/s": accepted_cell(stack, figures, metrics or {}),
        "Notes": "; ".join(notes),
        "Artifacts": ", ".join(artifacts),
    }


def _arg(argv: Sequence[str], *names: str) -> str | None:
    """The value of the first of `names` in argv (`--x v` or `--x=v`); "" for a bare flag."""
    for i, a in enumerate(argv):
        for n in names:
            if a == n:
                nxt = argv[i + 1] if i + 1 < len(argv) else ""
                return "" if nxt.startswith("-") else nxt
            if a.startswith(n + "="):
                return a[len(n) + 1 :]
    return None


def speculation(stack: StackIdentity | None) -> bool | None:
    """Whether the server decodes speculatively, from its command line; None: unknown."""
    if stack is None or not stack.command:
        return None
    return any(_arg(stack.command, flag) is not None for flag in SPECULATIVE_FLAGS)


def accepted_cell(
    stack: StackIdentity | None, figures: Sequence[Figure], metrics: Mapping[str, Any]
) -> str:
    spec = speculation(stack)
    if spec is None:
        return "unknown (server flags unknown)"
    if not spec:
        return "speculation off"
    rates = [_short(f) for f in figures if is_accepted_rate(f)]
    if rates:
        return "; ".join(rates)
    accepted = drafted = generated = 0.0
    seen = False
    for delta in metrics.values():
        counters = delta.get("counters") if isinstance(delta, Mapping) else None
        if not isinstance(counters, Mapping) or counters.get(ACCEPTED) is None:
            continue
        seen = True
        accepted += float(counters[ACCEPTED])
        drafted += float(counters.get(DRAFTED) or 0.0)
        generated += float(counters.get(GENERATED) or 0.0)
    if not seen:
        return "speculation on; not measured (no spec_decode_* counters in the /metrics deltas)"
    parts = [f"speculation on; {accepted:.0f} draft tokens accepted"]
    if drafted:
        parts.append(f"of {drafted:.0f} drafted ({accepted / drafted:.1%} acceptance)")
    if generated:
        parts.append(f"= {accepted / generated:.1%} of {generated:.0f} generated tokens")
    return " ".join(parts) + " over the measured tests; no accepted tok/s figure"


def run_notes(
    stack: StackIdentity | None,
    figures: Sequence[Figure],
    requests: Sequence[Mapping[str, Any]] = (),
) -> list[str]:
    """What is specific to this run: graph mode, prefix caching, speculation, parallelism,
    KV cache type, forced output lengths, warm/cold figures."""
    notes: list[str] = []
    argv = stack.command if stack is not None else ()
    if argv:
        if _arg(argv, "--enforce-eager") is not None:
            notes.append("--enforce-eager: eager mode, no graph capture or compilation")
        elif (cfg := _arg(argv, "--compilation-config")) is not None:
            notes.append(f"compiled graphs: --compilation-config {cfg}")
        if _arg(argv, "--no-enable-prefix-caching") is not None:
            notes.append("prefix caching off (--no-enable-prefix-caching)")
        elif _arg(argv, "--enable-prefix-caching") is not None:
            notes.append("prefix caching on (--enable-prefix-caching)")
        elif stack is not None and stack.engine_name == "vllm":
            notes.append("prefix caching on (vLLM's default; no flag)")
        else:
            notes.append("prefix caching: the engine's default (no flag)")
        if speculation(stack):
            how = next((v for flag in SPECULATIVE_FLAGS if (v := _arg(argv, flag))), "")
            notes.append(f"speculative decoding on {how}".rstrip())
        else:
            notes.append("no speculative decoding (no --speculative-config)")
        tp = _arg(argv, "--tensor-parallel-size", "-tp")
        if tp and tp != "1":
            notes.append(f"tensor parallel {tp}")
        kv = _arg(argv, "--kv-cache-dtype")
        if kv:
            notes.append(f"KV cache dtype {kv}")
    forced = forced_output_note(requests)
    if forced:
        notes.append(forced)
    cold = sum(1 for f in figures if not f.warm)
    if figures:
        notes.append(
            "all figures warm"
            if not cold
            else f"{cold} cold and {len(figures) - cold} warm figure(s), each labeled"
        )
    return notes


def forced_output_note(requests: Sequence[Mapping[str, Any]]) -> str | None:
    """How output lengths were set, from the raw rows' `requested_output_tokens`."""
    if not requests:
        return None
    forced = [r for r in requests if r.get("requested_output_tokens") is not None]
    if not forced:
        return "output length not forced (the model could stop at EOS)"
    done = [r for r in forced if r.get("error") is None]
    short = [
        r
        for r in done
        if r.get("completion_tokens") is not None
        and r["completion_tokens"] != r["requested_output_tokens"]
    ]
    reached = "each reached it" if not short else f"{len(short)} ended short of it"
    return (
        f"output length forced via ignore_eos on {len(forced)} of {len(requests)} requests "
        f"({reached})"
    )


# --------------------------------------------------------------------------- record.md


def _cell(s: object) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def render_markdown(record: Mapping[str, Any]) -> str:
    s = record["session"]
    lines = [
        "# servelab result record",
        "",
        f"- finished: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(s['finished_at']))}",
        f"- command: `{s['command']}`",
        f"- servelab commit: {s['servelab_commit']}; run by {s['by']}; host key "
        f"`{record['host']['key']}`",
        f"- exit status: {s['exit_status']}" + (" (interrupted)" if s["interrupted"] else ""),
    ]
    if s["invalid_reasons"]:
        lines.append("- **invalid run**: " + "; ".join(s["invalid_reasons"]))
    if s["failed_tests"]:
        lines.append("- failed tests: " + ", ".join(s["failed_tests"]))
    for res in record["results"]:
        lines += ["", f"## {res['profile']}", "", "| Field | Value |", "| --- | --- |"]
        lines += [f"| {k} | {_cell(v)} |" for k, v in res["community"].items()]
        lines += [
            "",
            "| Metric | Value | Unit | Shape | Conc. | Warm/cold | Runs | Verdict |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for f in res["figures"]:
            v = f["value"]
            shape = f["shape"]
            desc = ", ".join(
                f"{k.split('_')[0]} {shape[k]}"
                for k in ("prompt_tokens", "output_tokens", "context_tokens")
                if shape.get(k) is not None
            )
            verdict = f.get("verdict", {}).get("text", "not compared")
            lines.append(
                f"| {_cell(f['title'])} (`{f['metric']}`) | "
                f"{'n/a' if v is None else f'{v:.4g}'} | {f['unit']} | {desc} | "
                f"{f['concurrency']} | {f['state']} | {len(f['runs'])} | {_cell(verdict)} |"
            )
    return "\n".join(lines) + "\n"
