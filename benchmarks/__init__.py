"""Benchmarks of the train and evaluate paths on a Llama-3.2-1B-shaped model with random weights."""
