"""One benchmark run: evaluation settings (settings.py), inputs tokenized once (inputs.py), the run (run.py)."""
