"""The README's quick-start, run as a new user runs it: its marked command blocks, literally and in order, offline,
in a fresh clone of the project. The commands are read from README.md, so the two cannot drift. It is also the
pipeline's end-to-end test: after the first block (the offline profile as an experiment, then
`dvc exp run -S lora.r=16`, a metrics diff and `dvc exp show`), what DVC ran, skipped and records is checked."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_pipeline_dvc import ran, read_json, skipped

from conftest import ROOT, dvc_env, git, make_project, offline_params, run_dvc

pytestmark = pytest.mark.slow
STAGES = ["prepare", "tokenize_mask", "train", "evaluate_baseline", "evaluate_adapter", "compare", "card"]
ROUGE = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
KEY_METRICS = ["train_loss", "eval_loss", "tokens_per_s", "peak_memory_gib", "runtime_s", "rougeL.base",
               "rougeL.tuned", "rougeL.gain"]

# A block the test runs is a fenced block directly after one of these lines.
MARKERS = {"<!-- test: run -->": "bash", "<!-- test: python -->": "python"}
BLOCK = re.compile(r"^(<!-- test: (?:run|python) -->)\n```\w*\n(.*?)^```", re.M | re.S)


def readme_blocks(text: str) -> list[tuple[str, str]]:
    """The README's marked blocks in order, as (language, code)."""
    return [(MARKERS[marker], code) for marker, code in BLOCK.findall(text)]


def test_marked_blocks_are_found_in_order_and_nothing_else():
    text = ("intro\n<!-- test: run -->\n```bash\necho one   # a comment\n```\n"
            "```bash\nnot marked\n```\n<!-- test: python -->\n```python\nprint(2)\n```\n")
    assert readme_blocks(text) == [("bash", "echo one   # a comment\n"), ("python", "print(2)\n")]


def commands(blocks: list[tuple[str, str]]) -> str:
    return "\n".join(code for _, code in blocks)


def test_readme_quickstart_runs_as_written_offline(tmp_path):
    blocks = readme_blocks((ROOT / "README.md").read_text(encoding="utf-8"))
    text = commands(blocks)
    # What the quick-start promises a newcomer, in this order; each must be one of the commands the test runs.
    promised = ["python -m offline.run", "python -m stages.summarize dialogue.txt", "python -m stages.summarize ",
                "python -m stages.export", "git checkout params.yaml"]
    positions = [text.find(command) for command in promised]
    assert -1 not in positions, f"README's marked blocks lack {promised[positions.index(-1)]!r}"
    assert positions == sorted(positions), "the README runs `git checkout params.yaml` before using the result"
    assert any(language == "python" for language, _ in blocks)

    repo = make_project(tmp_path / "clone", {})
    (repo / "params.yaml").write_text(git(ROOT, "show", "HEAD:params.yaml"))  # the committed default job
    git(repo, "commit", "-qam", "the default job")
    default = (repo / "params.yaml").read_text(encoding="utf-8")
    # As on the machine of a user with no network who has set nothing: the commands as written reach for no hub
    # (offline.run runs its stages offline itself; what follows reads local files only).
    env = {**dvc_env(repo), "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0",
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]), "PAGER": "cat"}
    outputs = []
    for number, (language, code) in enumerate(blocks, 1):
        command = ["bash", "-euo", "pipefail", "-c", code] if language == "bash" else [sys.executable, "-c", code]
        proc = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, f"README block {number} ({language}) failed:\n{code}\n{proc.stdout}\n{proc.stderr}"
        assert "Traceback" not in proc.stderr, f"README block {number}:\n{proc.stderr}"
        outputs.append(proc.stdout)
        if number == 1:
            check_the_first_block(repo, code, proc, default)

    # The adapter summarized the dialogue file, the JSONL file (-o) and, through plain peft, the snippet's dialogue.
    written = re.findall(r"python -m stages\.summarize \S+ -o (\S+)", text)
    assert written, "the README summarizes no JSONL file into an output file"
    rows = [json.loads(line) for name in written for line in (repo / name).read_text().splitlines()]
    assert rows and all(set(row) == {"id", "dialogue", "summary"} and row["summary"].strip() for row in rows)
    assert (repo / "models/merged/config.json").is_file() and (repo / "models/merged/model.safetensors").is_file()
    # The export was checked against the evaluation: its default 64 rows, or the whole test split when smaller.
    check = json.loads((repo / "models/merged/export_check.json").read_text())
    evaluated = (repo / "data/predictions/adapter.jsonl").read_text().splitlines()
    assert check["passed"] and check["examples"] == min(64, len(evaluated)), check
    for (language, _), output in zip(blocks, outputs, strict=True):
        if language == "python":
            assert output.strip(), "the README's Python snippet printed no summary"
    # The last step returned the workspace to the default job.
    assert (repo / "params.yaml").read_text(encoding="utf-8") == default


def check_the_first_block(repo: Path, code: str, proc: subprocess.CompletedProcess, default_params: str) -> None:
    """What the quick-start's first block leaves: every stage run once on the offline profile, then only what
    lora.r touches; params, lock and metrics that agree; an adapter that beats the base and reloads with plain peft;
    metrics diffs, `dvc exp show` and plots that work with no flags."""
    assert code.startswith("python -m offline.run -n offline") and "dvc exp run -S lora.r=16" in code, code
    # offline.run, then the lora.r experiment: the data stages and the baseline are reused from the first run.
    stages = ran(proc.stdout)
    assert sorted(stages[:len(STAGES)]) == sorted(STAGES), stages
    assert stages[len(STAGES):] == ["train", "evaluate_adapter", "compare", "card"], stages
    assert sorted(skipped(proc.stdout)) == ["evaluate_baseline", "prepare", "tokenize_mask"]
    for line in ("error", "is_gradient_checkpointing", "kernels-community"):
        assert line not in proc.stderr.lower().replace("hf_hub", ""), line
    # What DVC records is true: params.yaml holds the profile (lora.r=16 on top) that produced the outputs.
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["model"]["base_model"] == "offline/tiny-llama" and params["data"]["source"] == "data/samples"
    assert params["lora"]["target_modules"] == offline_params()["lora"]["target_modules"] and params["lora"]["r"] == 16
    assert "# seeds sampling, LoRA initialisation" in (repo / "params.yaml").read_text()  # edited in place
    assert (repo / ".params.yaml.before-offline").read_text() == default_params
    assert "up to date" in run_dvc(repo, "status").stdout
    again = run_dvc(repo, "repro")
    assert ran(again.stdout) == [] and sorted(skipped(again.stdout)) == sorted(STAGES)
    assert read_json(repo / "models/adapter/adapter_config.json")["r"] == 16

    baseline, adapter = read_json(repo / "metrics/baseline.json"), read_json(repo / "metrics/adapter.json")
    for key in ROUGE:  # the fine-tune must clearly beat the untuned base on every metric
        assert adapter[key] > baseline[key] + 0.1, (key, baseline[key], adapter[key])
    gain = round(adapter["rougeL"] - baseline["rougeL"], 6)
    headline = read_json(repo / "metrics/compare.json")["rougeL"]
    assert {k: headline[k] for k in ("base", "tuned", "gain")} == {"base": baseline["rougeL"],
                                                                   "tuned": adapter["rougeL"], "gain": gain}
    assert 0 < headline["low"] < gain < headline["high"]  # the gain's 95% interval, clear of 0 on the profile
    train = read_json(repo / "metrics/train_run.json")
    assert train["quantized"] is True and train["device"] == "cpu" and train["steps"] == 200
    assert (repo / "models/adapter/adapter_model.safetensors").is_file()
    assert "| metric | baseline | fine-tuned | change |" in (repo / "metrics/compare.md").read_text()

    # The first diff of a fresh clone: against the offline run, by its name.
    diff = json.loads(run_dvc(repo, "metrics", "diff", "offline", "--all", "--json").stdout)
    assert sorted(diff) == ["metrics/compare.json", "metrics/train.json"]  # statistics are not metrics
    assert diff["metrics/compare.json"]["rougeL.base"]["diff"] == 0
    assert diff["metrics/compare.json"]["rougeL.tuned"]["diff"] != 0
    assert set(diff["metrics/train.json"]) == {"train_loss", "eval_loss", "tokens_per_s", "peak_memory_gib",
                                               "runtime_s"}

    # In a terminal, `dvc exp show` pages the table at its full width; the first 160 columns (what a normal
    # terminal shows before scrolling) hold every key metric, unabridged. `--only-changed` keeps the params that
    # differ (lora.r; the profile's values too, as the commit holds the default job's) and drops the others.
    for flags in ([], ["--only-changed"]):
        table = run_dvc(repo, "exp", "show", *flags).stdout.splitlines()
        screen = [line[:160] for line in table]
        header = next(line for line in screen if "Experiment" in line).split()
        assert header[:len(KEY_METRICS) + 2] == ["Experiment", "Created", *KEY_METRICS], header
        workspace = next(line for line in screen if line.split()[:1] == ["workspace"]).split()
        visible = workspace[:len(KEY_METRICS) + 2]
        assert len(visible) == len(KEY_METRICS) + 2 and "…" not in visible and "-" not in visible[2:], visible
    columns = next(line for line in table if "Experiment" in line).split()
    assert "lora.r" in columns and "model.base_model" in columns
    assert "quantization.bnb_4bit_quant_type" not in columns and "prompt.date_string" not in columns, columns

    plots = run_dvc(repo, "plots", "show", "--json")
    drawn = json.loads(plots.stdout)
    assert "errors" not in drawn and "WARNING" not in plots.stderr
    assert sorted(drawn["data"]) == ["Learning rate", "ROUGE, baseline vs fine-tuned", "Training and validation loss"]
    for plot in drawn["data"].values():
        assert plot[0]["content"]["data"]["values"]
    # Curves are drawn over optimizer steps, each logged step once.
    loss = drawn["data"]["Training and validation loss"][0]["content"]["data"]["values"]
    steps = sorted({int(v["step"]) for v in loss})
    assert steps[0] == 10 and steps[-1] == 200
    evals = [int(v["step"]) for v in loss if "eval" in json.dumps(v)]
    assert len(evals) == len(set(evals)) == 5, evals  # every 40 steps: once per epoch

    # The offline run's adapter, back in the workspace, reloads with plain peft. (Not the lora.r=16 one: trained at
    # the profile's high learning rate, its tiny model's greedy summaries drift apart between the evaluation's
    # merged weights and peft's 4-bit kernels.) The blocks after this one use it.
    run_dvc(repo, "exp", "apply", "offline")
    adapter_reloads_with_plain_peft(repo, yaml.safe_load((repo / "params.yaml").read_text()))


def adapter_reloads_with_plain_peft(repo: Path, params: dict, rows: int = 4) -> None:
    """Plain transformers + peft, no project code: the first logged predictions come back token for token."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    tokenizer = AutoTokenizer.from_pretrained(repo / "models/adapter")
    base = AutoModelForCausalLM.from_pretrained(
        repo / params["model"]["base_model"],
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32),
        dtype=torch.float32,
    )
    model = PeftModel.from_pretrained(base, repo / "models/adapter").eval()
    logged = [json.loads(line) for line in (repo / "data/predictions/adapter.jsonl").read_text().splitlines()]
    assert len(logged) == 40 and read_json(repo / "models/adapter/adapter_config.json")["r"] == params["lora"]["r"]
    for row in logged[:rows]:  # logged by the dequantized, merged path; regenerated here through the 4-bit kernels
        content = params["prompt"]["instruction"] + "\n\n" + row["dialogue"]
        text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True, date_string=params["prompt"]["date_string"])
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=params["eval"]["max_new_tokens"], do_sample=False,
                                 eos_token_id=tokenizer.convert_tokens_to_ids("<|eot_id|>"),
                                 pad_token_id=tokenizer.pad_token_id)
        new = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        assert new == row["prediction"]
