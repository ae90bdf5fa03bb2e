"""Whether the Hugging Face hub can be used now, decided once before the first download, and the error when not.

Without this, a machine with no network spends 25 s (a dataset) to 50 s (a tokenizer) in huggingface_hub's
retries before failing. Offline mode is read from the same environment variables the libraries read;
reachability is one HEAD request to the endpoint they would use (HF_ENDPOINT), through their own HTTP client
(so proxies and certificates are theirs too), bounded to a few seconds.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from samsum_qlora.errors import PipelineError

PROBE_SECONDS = 3.0
# How a data file's name ends: a local name, never a hub repository's.
FILE_SUFFIXES = frozenset({".json", ".jsonl", ".csv", ".tsv", ".parquet", ".arrow", ".txt", ".zip", ".gz", ".tar"})
# The first of these that is set decides, as in huggingface_hub (models) and datasets (which reads its own first).
MODEL_SWITCHES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
DATASET_SWITCHES = ("HF_DATASETS_OFFLINE", *MODEL_SWITCHES)
TRUE_VALUES = {"1", "ON", "YES", "TRUE"}
OFFLINE_PROFILE = "or run the offline profile, which needs no network: `python -m offline.run`"


def spelled_like_path(name: str) -> bool:
    """Whether `name` can only be a local path, whether or not it exists: it breaks huggingface_hub's rules for a
    repository id (`name` or `owner/name`, so no `/`, `.`, `~` or drive at the start and no third part), or it ends
    like a data file. The one rule the data source, the model loader and the model card go by."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return Path(name).suffix.lower() in FILE_SUFFIXES


def offline_switch(switches: tuple[str, ...] = MODEL_SWITCHES) -> str | None:
    """`NAME=value` of the environment variable that sets offline mode, or None when it is not set."""
    for name in switches:
        value = os.environ.get(name)
        if value:
            return f"{name}={value}" if value.upper() in TRUE_VALUES else None
    return None


@functools.cache
def _probe(url: str) -> str | None:
    """Why `url` gave no usable answer within PROBE_SECONDS, or None when it answered."""
    from huggingface_hub import get_session

    outcome: list[str | None] = []

    def head() -> None:
        try:
            status = get_session().head(url, timeout=PROBE_SECONDS).status_code
            outcome.append(f"HTTP {status}" if status >= 500 else None)
        except Exception as err:  # any failure to get an answer means the same here
            reason = (str(err).strip().splitlines() or [""])[0][:120]
            outcome.append(f"{type(err).__name__}: {reason}" if reason else type(err).__name__)

    # A thread, because a hanging DNS lookup ignores the request's timeout; daemon, so it can't hold up the exit.
    thread = threading.Thread(target=head, name="hub-probe", daemon=True)
    thread.start()
    thread.join(PROBE_SECONDS + 1)
    return outcome[0] if outcome else f"no answer within {PROBE_SECONDS:.0f} s"


def hub_unavailable(switches: tuple[str, ...] = MODEL_SWITCHES) -> str | None:
    """Why the hub can't be used now ("offline mode is set (…)", "the hub is unreachable at …"), or None."""
    from huggingface_hub import constants

    switch = offline_switch(switches)
    if switch:
        return f"offline mode is set ({switch})"
    address = constants.ENDPOINT  # where huggingface_hub sends its requests (HF_ENDPOINT, read at its import)
    problem = _probe(address)
    if problem:
        return f"the hub is unreachable at {address} ({problem})"
    return None


@contextmanager
def libraries_offline() -> Iterator[None]:
    """Keep huggingface_hub and datasets from any request (they read the offline variables only at import)."""
    from huggingface_hub import constants

    modules = [constants, sys.modules.get("datasets.config")]
    saved = [(module, module.HF_HUB_OFFLINE) for module in modules if module is not None]
    for module, _ in saved:
        module.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for module, value in saved:
            module.HF_HUB_OFFLINE = value


def unavailable_error(subject: str, why: str, detail: str, fix: str) -> PipelineError:
    """The one-line error for a hub id that is neither reachable nor cached, with fixes that work for any command."""
    return PipelineError(f"{subject}: {why} and {detail}; to work without network, {fix}, {OFFLINE_PROFILE}")
