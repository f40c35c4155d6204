"""``madseg report``: render an experiment's report (one self-contained HTML page + JSON)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report",
        help="render the experiment report (report.html + report.json)",
        description="Render one self-contained HTML page (images inline) and a JSON file with the same "
        "numbers from an experiment dir's results.json (written by `madseg round` / `madseg demo`).",
    )
    p.add_argument("--experiment", "-e", required=True, type=Path, metavar="DIR",
                   help="the experiment dir (holds results.json and round-*/)")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="where to write report.html and report.json (default: DIR/report)")
    p.add_argument("--max-gallery", type=int, default=12, metavar="N", help="images per gallery (default 12)")
    p.add_argument("--thumb-height", type=int, default=160, metavar="PX",
                   help="height of gallery thumbnails in pixels (default 160)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ml_backend.errors import MadsegError
    from projects.evaluation.report import load_results, render_report, stage_times
    from projects.layout import ExperimentLayout

    exp_dir: Path = args.experiment
    if not exp_dir.is_dir():
        raise MadsegError(f"{exp_dir}: experiment dir does not exist; pass the experiment's `dir`")
    if args.max_gallery < 0 or args.thumb_height < 16:
        raise MadsegError("--max-gallery must be >= 0 and --thumb-height >= 16")
    layout = ExperimentLayout.of(exp_dir)
    results = load_results(layout.results)
    if not results.get("stages"):
        results["stages"] = stage_times(exp_dir)
    files = render_report(results, args.out or layout.report, base_dir=exp_dir,
                          max_gallery=args.max_gallery, thumb_height=args.thumb_height)
    print(f"report: {files.html.resolve()}")
    print(f"numbers: {files.json.resolve()}")
    print(f"open it with: xdg-open {files.html.resolve()}  (or any browser; it has no external files)")
    return 0
