"""``openood-diffguard report RUN_DIR``: the run's self-contained HTML report (default RUN_DIR/report.html)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path, help="the demo's output folder, an OpenOOD main.py output directory "
                   "(or a folder holding exactly one), or a folder of score files / fuse --json outputs")
    p.add_argument("-o", "--out", type=Path, help="HTML file to write (default: report.html in the run folder)")
    p.add_argument("--trust-pickle", action="store_true", help="unpickle OpenOOD .pkl score files without "
                   "restriction (can run code: only for files you trust), as fuse --trust-pickle")
    p.add_argument("--screenshot", type=Path, help="also render the page in headless Chromium and save a PNG there (default: no screenshot)")
    p.add_argument("--width", type=int, default=1280, help="browser window width for --screenshot (pixels)")


def run(args: argparse.Namespace) -> int:
    from .page import write_report

    try:
        path = write_report(args.run_dir, args.out, trust_pickle=args.trust_pickle)
    except (FileNotFoundError, ValueError, KeyError, ImportError) as err:  # one clear line, no traceback
        print(f"openood-diffguard report: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    if args.screenshot is not None:
        from .browser import BrowserMissing, check_page

        try:
            page = check_page(path, args.screenshot, width=args.width)
        except BrowserMissing as err:
            print(f"openood-diffguard report: --screenshot: {err}", file=sys.stderr)
            return 2
        print(f"wrote {args.screenshot} ({page.summary()})")
        if page.problems():
            print("openood-diffguard report: the page has problems: " + "; ".join(page.problems()), file=sys.stderr)
            return 1
    return 0
