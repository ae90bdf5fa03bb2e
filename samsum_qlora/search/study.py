"""The Optuna side of a search: the study (SQLite on one machine, a database server across machines), its
sampler, pruner and distributions, and what a trial reports while it trains."""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from samsum_qlora.errors import PipelineError
from samsum_qlora.search.space import SearchSpec

log = logging.getLogger(__name__)

INTERRUPTED = "interrupted"  # user attr of a trial stopped by Ctrl-C (or left running by a driver that died)


def experiment_name(study: str, number: int) -> str:
    """The DVC experiment a finished trial becomes: <study>-<trial number>."""
    return f"{study}-{number}"


def quiet_optuna() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # its per-trial lines repeat the leaderboard's


def distributions(spec: SearchSpec) -> dict[str, Any]:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out: dict[str, Any] = {}
    for key, values in spec.space.items():
        if isinstance(values, list):
            out[key] = CategoricalDistribution([_choice(v) for v in values])
        elif values.integer:
            out[key] = IntDistribution(int(values.low), int(values.high), log=values.log,
                                       step=int(values.step or 1))
        else:
            out[key] = FloatDistribution(values.low, values.high, log=values.log, step=values.step)
    return out


def _choice(value: Any) -> Any:
    """Optuna's choices are scalars: a list (e.g. lora.target_modules) is kept as its JSON text."""
    return json.dumps(value, allow_nan=False) if isinstance(value, (list, dict)) else value


def param_value(value: Any) -> Any:
    """The params.yaml value of a sampled choice (the inverse of _choice)."""
    if isinstance(value, str) and value[:1] in "[{":
        return json.loads(value)
    return value


def sampler(spec: SearchSpec) -> Any:
    import optuna

    if spec.sampler == "grid":
        space = {k: [_choice(v) for v in values] for k, values in spec.space.items()}
        return _Grid(space, seed=spec.seed)
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=spec.seed)
    # constant_liar: trials running side by side are counted as poor, so TPE does not hand them all one point
    return optuna.samplers.TPESampler(seed=spec.seed, constant_liar=True)


def _grid_sampler_class() -> type:
    import optuna

    class Grid(optuna.samplers.GridSampler):
        def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
            pass  # it calls Study.stop() when the grid is done, which only optimize() allows: the driver counts

    return Grid


def _Grid(space: dict[str, list[Any]], seed: int) -> Any:  # noqa: N802 - a class made on first use
    return _grid_sampler_class()(space, seed=seed)


def pruner(spec: SearchSpec) -> Any:
    import optuna

    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=spec.startup_trials,
                                           n_warmup_steps=spec.prune_after_steps)
    if spec.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, spec.prune_after_steps) if
                                                      spec.prune_after_steps else "auto")
    return optuna.pruners.NopPruner()


def storage(url: str) -> Any:
    """Optuna's database storage; SQLite waits for a writer instead of failing at once (trials write too)."""
    import optuna

    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    except ImportError as err:
        raise PipelineError(f"--storage {url.split('://')[0]}://...: its database driver is missing ({err}); "
                            f"pip install psycopg2-binary for PostgreSQL") from None
    except Exception as err:  # sqlalchemy's OperationalError: a server that is down, a bad password
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PipelineError(f"--storage: cannot open the study database ({first}); check the URL and that "
                            f"the server is up") from None


def fingerprint(spec: SearchSpec, baseline: str) -> str:
    """What a study must keep to be continued: the baseline commit, the space and the objective."""
    what = {"baseline": baseline, "space": {k: v if isinstance(v, list) else v.model_dump()
                                            for k, v in spec.space.items()},
            "objective": spec.objective, "direction": spec.direction}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str, allow_nan=False).encode()).hexdigest()[:16]


def open_study(spec: SearchSpec, url: str, baseline: str) -> Any:
    """The study, new or continued; a study of that name with another baseline, space or objective is refused."""
    import optuna

    study = optuna.create_study(study_name=spec.name, storage=storage(url), direction=spec.direction,
                                sampler=sampler(spec), pruner=pruner(spec), load_if_exists=True)
    mark = fingerprint(spec, baseline)
    known = study.user_attrs.get("fingerprint")
    if known is None:
        study.set_user_attr("fingerprint", mark)
        study.set_user_attr("baseline", baseline)
        for point in spec.start_with:
            study.enqueue_trial({k: _choice(v) for k, v in point.items()})
    elif known != mark:
        raise PipelineError(f"study {spec.name!r} in {url.split('://')[0]} storage was started from commit "
                            f"{study.user_attrs.get('baseline', '?')[:8]} or with another space or objective; "
                            f"give this search another name (name: in the search file, or --name)")
    return study


def requeue_unfinished(study: Any) -> int:
    """Trials a stopped driver left running become failed (`interrupted`) and are queued again with the same
    params: the next run does them first and runs no finished trial twice."""
    from optuna.trial import TrialState

    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in stale:
        mark_interrupted(study, trial.number, trial.params)
    return len(stale)


def mark_interrupted(study: Any, number: int, params: dict[str, Any]) -> None:
    from optuna.trial import TrialState

    study._storage.set_trial_user_attr(study._storage.get_trial_id_from_study_id_trial_number(
        study._study_id, number), INTERRUPTED, True)
    study.tell(number, state=TrialState.FAIL)
    study.enqueue_trial(params, user_attrs={"rerun_of": number})


def finished_count(study: Any) -> int:
    """Trials that count towards the total: complete, pruned, or failed on their own (not interrupted)."""
    from optuna.trial import TrialState

    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
               or (t.state == TrialState.FAIL and not t.user_attrs.get(INTERRUPTED)))

