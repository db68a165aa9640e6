# Over 400 lines: seven commands' options and help text; their logic lives in library modules.
"""The `servelab` command line: the library's tools without pytest.

servelab prepare-model [--profile NAME]   prepare a profile's model; print path and hashes
servelab profiles [--json]                list profiles and whether this host can run them
servelab record [PATH | --list]           show a saved record (Markdown, JSON or claims)
servelab report [PATH...] [-o FILE]       self-contained HTML report of saved records
servelab compare NEW [OLD]                compare a record with another, or with baselines
servelab export --format vllm|bmf RECORD  a record as vLLM result JSON or Bencher BMF JSON
servelab import FILE... -o DIR            vLLM result JSON files as a servelab record
servelab verify RECORD                    recompute a record's figures, verdicts and hashes
servelab history RESULTS_DIR              change points over every record, with their causes
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from servelab.errors import ServelabError

DEFAULT_PROFILE = "cpu-smollm2"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EPILOG = """\
exit status:
  0  fine (compare: every figure judged, none regressed)
  1  compare: a regression, or a refused comparison (another stack or profile);
     verify: a check failed (each is named with where)
  2  bad input: an unknown profile or command-line value, a missing, corrupt or malformed
     record, profile or baseline file
"""


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("servelab")
    except metadata.PackageNotFoundError:  # run from a source tree that is not installed
        from servelab import __version__

        return __version__


def threshold_arg(text: str) -> float:
    """`--threshold`: a percentage in [1, 100) (5 means 5 %) or a fraction in (0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number; give a percentage such as 5 (= 5 %) or a fraction "
            "such as 0.05"
        ) from None
    if not math.isfinite(value) or value <= 0 or value >= 100:
        raise argparse.ArgumentTypeError(
            f"{text} is out of range; give a percentage in [1, 100) such as 5 (= 5 %), or a "
            "fraction in (0, 1) such as 0.05"
        )
    return value / 100 if value >= 1 else value


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
    return EXIT_OK


def profile_entries(dirs: Sequence[Path]) -> list[dict[str, Any]]:
    """Every profile found, with what it needs (hardware, engine, model, patches) and
    whether this host has its hardware; an invalid profile is an entry with its error."""
    from servelab.hardware import accelerator_available
    from servelab.profiles import available_profiles, load_profile

    out: list[dict[str, Any]] = []
    for name, path in sorted(available_profiles(dirs).items()):
        try:
            p = load_profile(path)
        except ServelabError as exc:
            out.append({"name": name, "path": str(path), "error": str(exc)})
            continue
        hw = p.hardware
        ok, why = accelerator_available(hw.accelerator, hw.count)
        out.append(
            {
                "name": p.name,
                "path": str(path),
                "description": p.description,
                "hardware": {
                    "accelerator": hw.accelerator,
                    "count": hw.count,
                    "description": hw.description,
                },
                "engine": {
                    "name": p.engine.name,
                    "kind": p.engine.kind,
                    "binary": p.engine.binary,
                    "distribution": p.engine.distribution,
                    "module": p.engine.module,
                    "install_hint": p.engine.install_hint,
                },
                "model": {
                    "served_name": p.model.served_name,
                    "source": p.model.source,
                    "quantization": p.model.quantization,
                    "context_len": p.model.context_len,
                },
                "patches": [Path(f).stem for f in p.patches.files],
                "available_here": ok,
                "unavailable_because": None if ok else why,
            }
        )
    return out


def cmd_profiles(args: argparse.Namespace) -> int:
    entries = profile_entries(_profile_dirs(args.profiles_dir))
    status = EXIT_USAGE if any("error" in e for e in entries) else EXIT_OK
    if args.json:
        print(json.dumps(entries, indent=2))
        return status
    if not entries:
        print("no profiles found")
        return EXIT_OK
    rows = [("profile", "accelerator", "engine", "patches", "context", "hardware here")]
    for e in entries:
        if "error" in e:
            rows.append((e["name"], "?", "?", "?", "?", f"INVALID: {e['error']}"))
            continue
        hw = e["hardware"]
        acc = "cpu" if hw["accelerator"] == "cpu" else f"{hw['count']}x {hw['accelerator']}"
        rows.append(
            (
                e["name"],
                acc,
                f"{e['engine']['name']} ({e['engine']['distribution'] or e['engine']['binary']})",
                ",".join(e["patches"]) or "none",
                str(e["model"]["context_len"]),
                "yes" if e["available_here"] else f"no: {e['unavailable_because']}",
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
        return EXIT_OK
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
            return EXIT_USAGE
    else:
        print(render_markdown(rec), end="")
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from servelab.records import load_record
    from servelab.redact import Redactor
    from servelab.report import render_html
    from servelab.report_data import load_requests

    results_dir = Path(args.results_dir)
    paths = [Path(p) for p in args.paths] or _record_paths(results_dir)[-1:]
    if not paths:
        print(
            f"servelab report: no records given and none under {results_dir / 'records'}; "
            "run `pytest -m perf` first or name a record folder",
            file=sys.stderr,
        )
        return EXIT_USAGE
    records = [load_record(p) for p in paths]
    requests = [load_requests(p) for p in paths]
    page = render_html(records, Redactor.from_sources(environ=os.environ), requests=requests)
    out = Path(args.output) if args.output else results_dir / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    print(f"wrote {out} ({len(page) // 1024} KiB, {len(records)} record(s))")
    return EXIT_OK


def cmd_compare(args: argparse.Namespace) -> int:
    from servelab.baselines import BaselineStore, Fingerprint, Verdict, judge, judge_against_record
    from servelab.records import load_record, record_figures
    from servelab.report import terminal_table
    from servelab.stats import DEFAULT_THRESHOLD

    new = load_record(Path(args.new))
    verdicts: list[Verdict] = []
    if args.old is not None:
        old = load_record(Path(args.old))
        old_results = {r["profile"]: r for r in old["results"]}
        new_profiles = [r["profile"] for r in new["results"]]
        missing = [p for p in new_profiles if p not in old_results]
        if missing:
            print(
                f"servelab compare: refused: {args.new} measured profile(s) "
                f"{', '.join(missing)}, which {args.old} does not have (it has "
                f"{', '.join(old_results) or 'none'}). Records of different profiles are not "
                "comparable: compare two records of the same profile, or compare NEW with the "
                "stored baselines (leave OLD out)",
                file=sys.stderr,
            )
            return EXIT_FAILED
        for res in new["results"]:
            prev = old_results[res["profile"]]
            old_figs = [f for f, _ in record_figures({"results": [prev]})]
            fp = Fingerprint(**res["fingerprint"])
            old_fp = Fingerprint(**prev["fingerprint"])
            for f, _ in record_figures({"results": [res]}):
                verdicts.append(
                    judge_against_record(
                        f,
                        fp,
                        old_figs,
                        old_fp,
                        Path(args.old),
                        threshold=DEFAULT_THRESHOLD if args.threshold is None else args.threshold,
                    )
                )
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
    return EXIT_FAILED if failed else EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from servelab.records import load_record
    from servelab.report_data import load_requests

    path = Path(args.record)
    record = load_record(path)
    if args.format == "bmf":
        from servelab.export_bmf import to_bmf

        text = json.dumps(to_bmf(record), indent=2) + "\n"
        if args.output:
            Path(args.output).write_text(text, encoding="utf-8")
            print(f"wrote {args.output}", file=sys.stderr)
        else:
            print(text, end="")
        return EXIT_OK
    from servelab.export_vllm import export_record

    results = export_record(record, load_requests(path), detailed=args.detailed)
    if not results:
        print(
            f"servelab export: {path} has no request rows (raw.jsonl) to export as vLLM results",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if not args.output:
        for _, res in results:  # one result per line, as `--append-result` writes them
            print(json.dumps(res))
        return EXIT_OK
    out = Path(args.output)
    if len(results) == 1 and out.suffix == ".json":
        targets = [(out, results[0][1])]
    else:
        targets = [(out / f"{name}.json", res) for name, res in results]
    for file, res in targets:
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(json.dumps(res), encoding="utf-8")
        print(f"wrote {file}", file=sys.stderr)
    return EXIT_OK


def cmd_import(args: argparse.Namespace) -> int:
    from servelab.export_vllm import import_results
    from servelab.records import write_record
    from servelab.redact import Redactor

    record = import_results([Path(p) for p in args.files], profile=args.profile)
    paths = write_record(Path(args.output), record, Redactor.from_sources(environ=os.environ))
    n = sum(len(r["figures"]) for r in record["results"])
    print(f"wrote {paths.folder} ({len(args.files)} file(s), {n} figures)")
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from servelab.verify import verify_record

    report = verify_record(Path(args.record))
    print("\n".join(report.lines(verbose=args.verbose)))
    return EXIT_OK if report.ok else EXIT_FAILED


def cmd_history(args: argparse.Namespace) -> int:
    from servelab.history import history, lines, load_resets, to_json

    resets = load_resets(Path(args.resets)) if args.resets else []
    found = history(
        Path(args.results_dir),
        args.profile,
        resets,
        max_pvalue=args.max_pvalue,
        min_change=args.min_change,
    )
    print(to_json(found) if args.json else "\n".join(lines(found, max_pvalue=args.max_pvalue)))
    return EXIT_OK


def _command(
    sub: Any, name: str, help: str, func: Any, description: str | None = None
) -> argparse.ArgumentParser:
    s: argparse.ArgumentParser = sub.add_parser(
        name,
        help=help,
        description=description or help,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.set_defaults(func=func)
    return s


def _profiles_dir_option(s: argparse.ArgumentParser) -> None:
    s.add_argument(
        "--profiles-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="another folder of profile TOML files, searched before fixtures/profiles (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="servelab",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = _command(
        sub, "prepare-model", "prepare a profile's model, print path and hashes", cmd_prepare_model
    )
    s.add_argument(
        "--profile",
        default=DEFAULT_PROFILE,
        metavar="NAME",
        help=f"profile whose model to prepare (default: {DEFAULT_PROFILE})",
    )
    _profiles_dir_option(s)

    s = _command(sub, "profiles", "list profiles and whether their hardware is here", cmd_profiles)
    s.add_argument(
        "--json",
        action="store_true",
        help="print every profile as JSON: name, hardware (accelerator, count), engine, "
        "model, patches, and whether this host has the hardware (the CI matrix reads it)",
    )
    _profiles_dir_option(s)

    s = _command(sub, "record", "show a saved record", cmd_record)
    s.add_argument(
        "path", nargs="?", metavar="PATH", help="record folder or record.json (default: --list)"
    )
    s.add_argument(
        "--format",
        choices=("md", "json", "claims"),
        default="md",
        help="md: the community table and every figure; json: record.json; claims: the "
        "claims-registry files (exit 2 when one does not validate) (default: md)",
    )
    s.add_argument("--list", action="store_true", help="list the saved records under --results-dir")
    s.add_argument(
        "--results-dir",
        default="results",
        metavar="DIR",
        help="where pytest wrote its results; records are under DIR/records (default: results)",
    )

    s = _command(sub, "report", "write a self-contained HTML report of saved records", cmd_report)
    s.add_argument(
        "paths",
        nargs="*",
        metavar="PATH",
        help="record folders or record.json files (default: the newest under --results-dir)",
    )
    s.add_argument(
        "-o",
        "--output",
        default=None,
        metavar="FILE",
        help="where to write the HTML (default: DIR/report.html of --results-dir)",
    )
    s.add_argument(
        "--results-dir",
        default="results",
        metavar="DIR",
        help="where pytest wrote its results: the newest record under DIR/records is "
        "reported when no PATH is given, and the report goes to DIR/report.html "
        "(default: results)",
    )

    s = _command(
        sub, "compare", "compare a record with another record or the baselines", cmd_compare
    )
    s.add_argument("new", metavar="NEW", help="record folder or record.json to judge")
    s.add_argument(
        "old",
        nargs="?",
        metavar="OLD",
        help="record of the same profile to judge against (default: the stored baselines)",
    )
    s.add_argument(
        "--baselines-dir",
        default="baselines",
        metavar="DIR",
        help="stored baselines to judge against when OLD is not given (default: baselines)",
    )
    s.add_argument(
        "--threshold",
        type=threshold_arg,
        default=None,
        metavar="T",
        help="practical threshold for every metric: a percentage in [1, 100) (5 = 5 %%) or a "
        "fraction in (0, 1) (0.05) (default: each baseline metric's own; 5 %% between records)",
    )

    s = _command(
        sub, "export", "write a record as vLLM result JSON or Bencher BMF JSON", cmd_export
    )
    s.add_argument("record", metavar="RECORD", help="record folder or record.json")
    s.add_argument(
        "--format",
        choices=("vllm", "bmf"),
        required=True,
        help="vllm: the keys `vllm bench serve --save-result` writes, one result per target, "
        "test and run (from raw.jsonl); bmf: Bencher Metric Format, one benchmark per profile, "
        "shape and concurrency, one measure per metric",
    )
    s.add_argument(
        "-o",
        "--output",
        default=None,
        metavar="PATH",
        help="where to write: vllm: FILE.json for one result, else a folder of NAME.json; "
        "bmf: a file (default: standard output; vllm: one result per line)",
    )
    s.add_argument(
        "--detailed",
        action="store_true",
        help="vllm: add the per-request arrays of `--save-detailed` (input_lens, output_lens, "
        "start_times, ttfts, itls, generated_texts, errors)",
    )

    s = _command(sub, "import", "read vLLM result JSON files into a servelab record", cmd_import)
    s.add_argument(
        "files", nargs="+", metavar="FILE", help="`vllm bench serve --save-result` files"
    )
    s.add_argument(
        "--profile",
        default=None,
        metavar="NAME",
        help="profile name of the record (default: the files' label, else vllm-import)",
    )
    s.add_argument("-o", "--output", required=True, metavar="DIR", help="record folder to write")
    s = _command(
        sub,
        "verify",
        "recompute a record's figures and verdicts from its rows; check its hashes",
        cmd_verify,
    )
    s.add_argument("record", metavar="RECORD", help="record folder or record.json")
    s.add_argument("-v", "--verbose", action="store_true", help="list the checks that hold too")

    s = _command(
        sub,
        "history",
        "find change points over every record of a (host, profile), attributed to the stack",
        cmd_history,
    )
    s.add_argument("results_dir", metavar="RESULTS_DIR", help="holds the records (DIR/records)")
    s.add_argument("--profile", default=None, metavar="P", help="only this profile")
    s.add_argument(
        "--resets",
        default=None,
        metavar="FILE",
        help="annotated baseline resets ([[reset]] at, reason; optional profile, host, figure)",
    )
    s.add_argument(
        "--max-pvalue", type=float, default=0.001, metavar="P", help="t-test cut (default 0.001)"
    )
    s.add_argument(
        "--min-change",
        type=float,
        default=0.0,
        metavar="F",
        help="ignore level changes under this fraction (default 0)",
    )
    s.add_argument("--json", action="store_true", help="print the series and change points")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ServelabError as exc:
        print(f"servelab {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (TypeError, ValueError) as exc:
        # A record whose fingerprint or figures do not have the expected fields.
        print(f"servelab {args.command}: malformed input ({exc})", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
