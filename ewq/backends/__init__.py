"""Evaluation engines behind one interface (see base.Backend)."""
