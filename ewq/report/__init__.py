"""The comparison report: result files -> reports/report.md (page.py) and its PNG figures (plots.py)."""
