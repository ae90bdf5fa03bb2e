"""End to end through DVC on the offline profile, in a throwaway git repository (as a user would run it)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, dvc_env, git, make_project, offline_params, run_dvc

pytestmark = pytest.mark.slow
STAGES = ["prepare", "tokenize_mask", "train", "evaluate_baseline", "evaluate_adapter", "compare", "card"]
ROUGE = ["rouge1", "rouge2", "rougeL", "rougeLsum"]


def ran(output: str) -> list[str]:
    """The stages DVC says it ran, in order."""
    return re.findall(r"Running stage '([\w-]+)'", output)


def skipped(output: str) -> list[str]:
    return re.findall(r"Stage '([\w-]+)' didn't change, skipping", output)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def commit_all(repo: Path, message: str) -> None:
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", message)


def test_data_stages_run_once_and_rerun_only_what_a_param_touches(tmp_path):
    repo = make_project(tmp_path / "repo", offline_params())
    first = run_dvc(repo, "repro", "tokenize_mask")
    assert ran(first.stdout) == ["prepare", "tokenize_mask"]
    for split in ("train", "validation", "test"):
        assert (repo / f"data/prepared/{split}.jsonl").is_file()
    assert (repo / "data/tokenized/dataset_dict.json").is_file()
    assert read_json(repo / "metrics/data.json")["train"]["rows_out"] == 320
    assert read_json(repo / "metrics/tokens.json")["train"]["examples"] == 320

    again = run_dvc(repo, "repro", "tokenize_mask")
    assert ran(again.stdout) == []
    assert sorted(skipped(again.stdout)) == ["prepare", "tokenize_mask"]

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["prompt"]["max_length"] = 200
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = run_dvc(repo, "repro", "tokenize_mask")
    assert ran(changed.stdout) == ["tokenize_mask"]
    assert skipped(changed.stdout) == ["prepare"]
    assert read_json(repo / "metrics/tokens.json")["train"]["length_max"] <= 200


def test_samsum_style_folder_without_ids_flows_through_the_data_stages(tmp_path):
    folder = tmp_path / "my-dialogues"
    folder.mkdir()
    samples = Path(__file__).resolve().parents[1] / "data" / "samples"
    for split in ("train", "validation", "test"):
        rows = json.loads((samples / f"{split}.json").read_text())[:12]
        (folder / f"{split}.json").write_text(json.dumps([{"dialogue": r["dialogue"], "summary": r["summary"]}
                                                          for r in rows]))
    repo = make_project(tmp_path / "repo", offline_params())
    out = run_dvc(repo, "exp", "run", "-S", f"data.source={folder}", "tokenize_mask")
    assert ran(out.stdout) == ["prepare", "tokenize_mask"]
    rows = [json.loads(line) for line in (repo / "data/prepared/train.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all(re.fullmatch(r"train-[0-9a-f]{12}", r["id"]) for r in rows)
    assert read_json(repo / "metrics/tokens.json")["validation"]["examples"] == 12


def offline_run(repo: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -m offline.run` in a project copy, as a user runs it."""
    proc = subprocess.run([sys.executable, "-m", "offline.run", *args], cwd=repo, env=dvc_env(repo),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


KEY_METRICS = ["train_loss", "eval_loss", "tokens_per_s", "peak_memory_gib", "runtime_s", "rougeL.base",
               "rougeL.tuned", "rougeL.gain"]


def test_offline_pipeline_end_to_end(tmp_path):
    default_params = git(ROOT, "show", "HEAD:params.yaml")  # the committed file, not the workspace's experiment
    repo = make_project(tmp_path / "repo", yaml.safe_load(default_params))
    (repo / "params.yaml").write_text(default_params)  # the committed file, comments included
    commit_all(repo, "default params")

    first = offline_run(repo, "-n", "offline")  # as the README's offline section says
    assert sorted(ran(first.stdout)) == sorted(STAGES)
    # What DVC records is true: params.yaml holds the profile that produced the outputs, nothing is stale.
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["model"]["base_model"] == "offline/tiny-llama" and params["data"]["source"] == "data/samples"
    assert params["lora"]["target_modules"] == offline_params()["lora"]["target_modules"]
    assert "# seeds sampling, LoRA initialisation" in (repo / "params.yaml").read_text()  # edited in place
    assert (repo / ".params.yaml.before-offline").read_text() == default_params
    assert "up to date" in run_dvc(repo, "status").stdout
    for line in ("error", "is_gradient_checkpointing", "kernels-community"):
        assert line not in first.stderr.lower().replace("hf_hub", ""), line

    baseline = read_json(repo / "metrics/baseline.json")
    adapter = read_json(repo / "metrics/adapter.json")
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

    again = run_dvc(repo, "repro")
    assert ran(again.stdout) == [] and sorted(skipped(again.stdout)) == sorted(STAGES)

    # Determinism: forced re-runs with the same seed reproduce every loss, prediction and score exactly.
    predictions = (repo / "data/predictions/adapter.jsonl").read_bytes()
    losses = read_json(repo / "metrics/train.json")
    forced = run_dvc(repo, "repro", "--force", "--single-item", "train", "evaluate_baseline", "evaluate_adapter")
    assert sorted(ran(forced.stdout)) == ["evaluate_adapter", "evaluate_baseline", "train"]
    assert (repo / "data/predictions/adapter.jsonl").read_bytes() == predictions
    for name, before in (("baseline", baseline), ("adapter", adapter)):
        after = read_json(repo / f"metrics/{name}.json")
        assert {k: after[k] for k in ROUGE} == {k: before[k] for k in ROUGE}
    retrained = read_json(repo / "metrics/train.json")
    assert (retrained["train_loss"], retrained["eval_loss"]) == (losses["train_loss"], losses["eval_loss"])

    # The README's experiment commands work as written on the profile: no wrapper, no network settings.
    r16 = run_dvc(repo, "exp", "run", "-S", "lora.r=16", env={**dvc_env(repo), "HF_HUB_OFFLINE": "0"})
    assert ran(r16.stdout) == ["train", "evaluate_adapter", "compare", "card"]
    assert sorted(skipped(r16.stdout)) == ["evaluate_baseline", "prepare", "tokenize_mask"]
    assert read_json(repo / "models/adapter/adapter_config.json")["r"] == 16

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


def test_saved_adapter_reloads_with_plain_peft_and_reproduces_predictions(tmp_path):
    """Plain transformers + peft, no project code: the logged predictions come back token for token."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    repo = make_project(tmp_path / "repo", offline_params(eval={"max_samples": 4}))
    run_dvc(repo, "repro", "evaluate_adapter")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    tokenizer = AutoTokenizer.from_pretrained(repo / "models/adapter")
    base = AutoModelForCausalLM.from_pretrained(
        repo / params["model"]["base_model"],
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32),
        dtype=torch.float32,
    )
    model = PeftModel.from_pretrained(base, repo / "models/adapter").eval()
    rows = [json.loads(line) for line in (repo / "data/predictions/adapter.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    for row in rows:  # logged by the dequantized, merged path; regenerated here through the 4-bit kernels
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
