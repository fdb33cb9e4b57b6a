#!/usr/bin/env python3
"""Compare benchmark results: writes reports/report.md with the summary table and PNG plots."""
from ewq.commands.common import run_main
from ewq.commands.report import main

if __name__ == "__main__":
    run_main(main)
