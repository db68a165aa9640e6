"""The `servelab` command line: the library's tools without pytest.

    servelab prepare-model [--profile NAME]   prepare a profile's model; print path and hashes
    servelab profiles                         list profiles and whether this host can run them
    servelab record [PATH | --list]           show a saved record (Markdown, JSON or claims)
    servelab report PATH... [-o FILE]         self-contained HTML report of saved records
    servelab compare NEW [OLD]                compare a record with another, or with baselines

Exit status: 0 fine, 1 a regression or a refused comparison, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from servelab.errors import ServelabError

DEFAULT_PROFILE = "cpu-smollm2"


def _profile_dirs(extra: Sequence[str]) -> list[Path]:
    from servelab.profiles import default_profile_dirs

    return [Path(d) for d in extra] + default_profile_dirs(Path.cwd()) + default_profile_dirs()


def cmd_prepare_model(args: argparse.Namespace) -> int:
    from servelab.models import prepare_model
    from servelab.profiles import find_profile, load_profile

    profile = load_profile(find_profile(args.profile, _profile_dirs(args.profiles_dir)))
    prepared = prepare_model(profile)
    print(f"profile:        {profile.name}")
    print(f"model path:     {prepared.path}")
    print(f"source:         {prepared.source}")
    print(f"source sha256:  {prepared.source_sha256 or '(not computed: model.source = path)'}")
    print(f"weights sha256: {prepared.weights_sha256 or '(not computed: model.source = path)'}")
    return 0


def cmd_profiles(args: argparse.Namespace) -> int:
    from servelab.hardware import accelerator_available
    from servelab.profiles import available_profiles, load_profile

    found = available_profiles(_profile_dirs(args.profiles_dir))
    if not found:
        print("no profiles found")
        return 0
    rows = [("profile", "accelerator", "engine", "patches", "context", "hardware here")]
    status = 0
    for name, path in sorted(found.items()):
        try:
            p = load_profile(path)
        except ServelabError as exc:
            rows.append((name, "?", "?", "?", "?", f"INVALID: {exc}"))
            status = 2
            continue
        hw = p.hardware
        acc = "cpu" if hw.accelerator == "cpu" else f"{hw.count}x {hw.accelerator}"
        ok, why = accelerator_available(hw.accelerator, hw.count)
        rows.append(
            (
                name,
                acc,
                f"{p.engine.name} ({p.engine.distribution})",
                ",".join(Path(f).stem for f in p.patches.files) or "none",
                str(p.model.context_len),
                "yes" if ok else f"no: {why}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:5], widths, strict=True)) + "  " + r[5])
    return status


def _record_paths(results_dir: Path) -> list[Path]:
    root = results_dir / "records"
    return sorted(p.parent for p in root.glob("*/record.json")) if root.is_dir() else []


def cmd_record(args: argparse.Namespace) -> int:
    from servelab.claims import claims, validate_claim
    from servelab.records import load_record, render_markdown

    if args.list or args.path is None:
        paths = _record_paths(Path(args.results_dir))
        if not paths:
            print(f"no records under {Path(args.results_dir) / 'records'}")
        for p in paths:
            rec = load_record(p)
            n = sum(len(r["figures"]) for r in rec["results"])
            profiles = ", ".join(r["profile"] for r in rec["results"])
            print(f"{p}  {profiles}  {n} figures")
        return 0
    rec = load_record(Path(args.path))
    if args.format == "json":
        print(json.dumps(rec, indent=2))
    elif args.format == "claims":
        items = claims(rec)
        bad = [(c["id"], validate_claim(c)) for c in items]
        print(json.dumps(items, indent=2))
        if any(problems for _, problems in bad):
            for cid, problems in bad:
                for problem in problems:
                    print(f"{cid}: {problem}", file=sys.stderr)
            return 2
    else:
        print(render_markdown(rec), end="")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from servelab.records import load_record
    from servelab.redact import Redactor
    from servelab.report import render_html

    paths = [Path(p) for p in args.paths] or _record_paths(Path(args.results_dir))[-1:]
    if not paths:
        print(f"no records given and none under {args.results_dir}/records", file=sys.stderr)
        return 2
    records = [load_record(p) for p in paths]
    page = render_html(records, Redactor.from_sources(environ=os.environ))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    print(f"wrote {out} ({len(page) // 1024} KiB, {len(records)} record(s))")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from servelab.baselines import (
        BaselineStore,
        Fingerprint,
        judge,
    )
    from servelab.records import load_record, record_figures
    from servelab.report import terminal_table

    new = load_record(Path(args.new))
    verdicts = []
    if args.old is not None:
        from servelab.baselines import Baseline, MetricBaseline, Provenance, figure_key

        old = load_record(Path(args.old))
        old_results = {r["profile"]: r for r in old["results"]}
        for res in new["results"]:
            prev = old_results.get(res["profile"])
            fp = Fingerprint(**res["fingerprint"])
            base = None
            if prev is not None:
                old_figs = record_figures({"results": [prev]})
                base = Baseline(
                    res["profile"],
                    Fingerprint(**prev["fingerprint"]),
                    Provenance("", "", "", "", ""),
                    {
                        figure_key(f): MetricBaseline.from_figure(f, args.threshold or 0.05, "")
                        for f, _ in old_figs
                    },
                )
            for f, _ in record_figures({"results": [res]}):
                verdicts.append(judge(f, base, fp, Path(args.old), threshold=args.threshold))
    else:
        store = BaselineStore(Path(args.baselines_dir))
        for res in new["results"]:
            fp = Fingerprint(**res["fingerprint"])
            path = store.path(fp.host_key, res["profile"])
            base = store.load(fp.host_key, res["profile"])
            for f, _ in record_figures({"results": [res]}):
                verdicts.append(judge(f, base, fp, path, threshold=args.threshold))
    for line in terminal_table(verdicts):
        print(line)
    failed = [v for v in verdicts if v.failed]
    for v in verdicts:
        if v.status != "no change":
            print(f"{v.figure.metric} ({v.figure.shape.describe()}): {v.text}")
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="servelab", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("prepare-model", help="prepare a profile's model, print path and hashes")
    s.add_argument("--profile", default=DEFAULT_PROFILE)
    s.add_argument("--profiles-dir", action="append", default=[])
    s.set_defaults(func=cmd_prepare_model)
    s = sub.add_parser("profiles", help="list profiles and whether their hardware is here")
    s.add_argument("--profiles-dir", action="append", default=[])
    s.set_defaults(func=cmd_profiles)
    s = sub.add_parser("record", help="show a saved record")
    s.add_argument("path", nargs="?", help="record folder or record.json")
    s.add_argument("--format", choices=("md", "json", "claims"), default="md")
    s.add_argument("--list", action="store_true", help="list saved records")
    s.add_argument("--results-dir", default="results")
    s.set_defaults(func=cmd_record)
    s = sub.add_parser("report", help="write a self-contained HTML report of saved records")
    s.add_argument("paths", nargs="*", help="record folders (default: the newest)")
    s.add_argument("-o", "--output", default="results/report.html")
    s.add_argument("--results-dir", default="results")
    s.set_defaults(func=cmd_report)
    s = sub.add_parser("compare", help="compare a record with another record or the baselines")
    s.add_argument("new", help="record folder or record.json to judge")
    s.add_argument("old", nargs="?", help="record to compare against (default: baselines)")
    s.add_argument("--baselines-dir", default="baselines")
    s.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="practical threshold for every metric (default: per metric, 0.05)",
    )
    s.set_defaults(func=cmd_compare)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ServelabError as exc:
        print(f"servelab {args.command}: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        print(
            f"servelab {args.command}: {exc}; the HTML report needs matplotlib "
            "(pip install 'servelab[report]')",
            file=sys.stderr,
        )
        return 2
    except (TypeError, ValueError) as exc:
        # A record whose fingerprint or figures do not have the expected fields.
        print(f"servelab {args.command}: malformed input ({exc})", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
