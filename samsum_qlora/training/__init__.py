"""Training: batching, the summary objective, token-capped passes, resuming and the training curves."""
