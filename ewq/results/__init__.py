"""Results on disk: safe writes (io.py), the result file's layout and reader (record.py), checkpoints for
--resume (checkpoint.py), the measuring environment (environment.py)."""
