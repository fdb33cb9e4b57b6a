"""Offline evaluation data: Wikipedia text, MMLU questions, generation prompts."""
