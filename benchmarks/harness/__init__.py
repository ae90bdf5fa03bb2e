"""What the benchmark scripts share: the Llama model shapes (shapes), SAMSum's lengths (lengths), the SAMSum-size
dataset (dataset), the report and its result file (report), --set overrides (overrides), the throughput meter
(meter), the tutorial/TRL/project training setups (setups), timed DVC commands (dvc_runs), DVC's experiment queue
(dvc_queue), and data-parallel runs handed to worker processes (workers)."""
