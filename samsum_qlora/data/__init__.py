"""Data: loading a dataset's splits (local files or the hub) and the prompt, with its loss mask."""
