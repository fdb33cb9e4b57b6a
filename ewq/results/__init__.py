"""Results on disk: the result file's layout and reader (record.py), every figure's Estimate (estimate.py),
checkpoints for --resume (checkpoint.py), the measuring environment (environment.py)."""
