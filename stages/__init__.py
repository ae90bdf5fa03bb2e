"""What a user runs: one module per DVC stage (`python -m stages.<name>`, as dvc.yaml calls it) and the commands
beside the pipeline (summarize, export). The library they call is the samsum_qlora package."""

import samsum_qlora  # noqa: F401  (first, before any stage imports transformers: see samsum_qlora/__init__.py)
