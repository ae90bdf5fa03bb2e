"""Evaluation: generating summaries, scoring them with ROUGE, the comparison report and its charts, the model card."""
