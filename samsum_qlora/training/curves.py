"""Training curves for `dvc plots`: transformers' DVCLive callback, with every point at its optimizer step."""

from __future__ import annotations

import logging

from samsum_qlora.paths import CURVES

log = logging.getLogger(__name__)


def curves_callback(resume: bool) -> list:
    """A callback writing the Trainer's logs to CURVES as DVCLive tables whose `step` is the optimizer step.

    dvc.yaml declares the plots (dvcyaml=None keeps dvclive from rewriting dvc.yaml inside a running stage).
    """
    try:
        from dvclive import Live
    except ImportError:  # a bare environment (e.g. a GPU box running the stage modules directly)
        log.warning("dvclive is not installed: no training curves in %s", CURVES)
        return []
    from transformers.integrations import DVCLiveCallback

    class StepCurves(DVCLiveCallback):
        # DVCLive counts its own logging calls (0, 1, 2, ...); the plots' x axis is the optimizer step instead,
        # which also keeps a resumed run's points where they belong.
        def on_log(self, args, state, control, model=None, logs=None, **kwargs):
            if self.live is not None:
                self.live.step = state.global_step
            super().on_log(args, state, control, model=model, logs=logs, **kwargs)

    return [StepCurves(live=Live(CURVES, dvcyaml=None, save_dvc_exp=False, resume=resume, report=None))]
