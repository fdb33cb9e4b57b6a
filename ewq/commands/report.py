"""compare_results.py: turn benchmark_results/*.json into reports/report.md with its PNG figures."""
from __future__ import annotations

from pathlib import Path

from ..console import log
from ..report import page
from ..fileio import check_writable_dir
from ..results.record import Variant
from .common import PLANS_DIR, REPORTS_DIR, RESULTS_DIR, Parser, add_dry_run_arg, dry_run


def main(argv=None) -> None:
    parser = Parser(description="Turn benchmark_results/*.json into a markdown comparison report with PNG plots.")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="benchmark JSON files")
    parser.add_argument("--plans-dir", type=Path, default=PLANS_DIR, help="for the entropy heatmap")
    parser.add_argument("--out-dir", type=Path, default=REPORTS_DIR, help="where report.md and its PNGs go")
    parser.add_argument("--model-hash", help="model hash to compare; None: that of the newest original")
    parser.add_argument("--settings", help="settings digest to compare; None: that of the newest original")
    parser.add_argument("--baseline", default=Variant.GGUF_Q4_K_M.value,
                        help="variant every KLD is paired against in the equal-size table")
    add_dry_run_arg(parser, "list what would be compared")
    args = parser.parse_args(argv)
    check_writable_dir(args.out_dir)
    if args.dry_run:
        found, studies = page.load_results(args.results_dir)
        reference = page.pick_reference(found, args.model_hash, args.settings)
        rows, left_out = page.comparable(found, reference)
        return dry_run([f"compare {len(rows)} results: {', '.join(r.label for r in rows)}",
                        *[f"leave out {r.path.name}: {why}" for r, why in left_out],
                        f"write {args.out_dir / 'report.md'} and its PNG figures"])
    path = page.build(args.results_dir, args.plans_dir, args.out_dir, args.model_hash, args.settings, args.baseline)
    log(f"report written: {path}")
    print(path)
