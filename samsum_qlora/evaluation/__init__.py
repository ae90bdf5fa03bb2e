"""Evaluation: ROUGE scoring of generated summaries."""
