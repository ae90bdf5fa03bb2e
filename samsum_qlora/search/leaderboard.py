"""The search's result: every trial ranked (finished ones by the objective, then pruned, failed and interrupted
ones), and the best one named as the DVC experiment to apply."""

from __future__ import annotations

from typing import Any

from samsum_qlora.search.study import INTERRUPTED, experiment_name, param_value

ORDER = {"complete": 0, "pruned": 1, "failed": 2, INTERRUPTED: 3}


def state_of(trial: Any) -> str:
    name = trial.state.name.lower()
    if name == "fail" and trial.user_attrs.get(INTERRUPTED):
        return INTERRUPTED
    return {"fail": "failed", "running": "running", "waiting": "waiting"}.get(name, name)


def rows(study: Any, maximize: bool) -> list[dict[str, Any]]:
    """One row per trial, best first: trial, experiment, params, value, state, step (for pruned ones), seconds."""
    out = []
    for t in study.get_trials(deepcopy=False):
        state = state_of(t)
        if state == "waiting":
            continue
        experiment = experiment_name(study.study_name, t.number) if state == "complete" else ""
        out.append({"trial": t.number, "experiment": experiment,
                    "params": {k: param_value(v) for k, v in t.params.items()},
                    # a pruned trial's value is Optuna's last intermediate one, a validation loss: not the objective
                    "value": t.value if state == "complete" else None, "state": state,
                    "step": t.user_attrs.get("step") if state == "pruned" else None,
                    "seconds": t.user_attrs.get("seconds"), "reason": t.user_attrs.get("reason", ""),
                    "log": t.user_attrs.get("log", "")})
    sign = -1 if maximize else 1
    return sorted(out, key=lambda r: (ORDER.get(r["state"], 4), sign * r["value"] if r["value"] is not None else 0,
                                      r["trial"]))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def table(board: list[dict[str, Any]], objective: str) -> str:
    """The leaderboard as a Markdown table."""
    keys = list(dict.fromkeys(k for row in board for k in row["params"]))
    head = ["trial", "experiment", *keys, objective, "state", "time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in board:
        state = row["state"] + (f" at step {row['step']}" if row["step"] is not None else "")
        if row["state"] == "failed" and row["reason"]:
            state += f" ({row['reason']}; log: {row['log']})"
        seconds = f"{row['seconds']:.0f} s" if row["seconds"] is not None else ""
        cells = [row["trial"], row["experiment"], *(row["params"].get(k) for k in keys),
                 f"{row['value']:.4f}" if row["value"] is not None else "", state, seconds]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def best_line(board: list[dict[str, Any]], objective: str) -> str:
    best = next((row for row in board if row["state"] == "complete"), None)
    if best is None:
        return "no trial finished: see the failed trials' logs above"
    return (f"best: trial {best['trial']}, experiment {best['experiment']} ({objective} {best['value']:.4f}); "
            f"bring it into the workspace with: dvc exp apply {best['experiment']}")
