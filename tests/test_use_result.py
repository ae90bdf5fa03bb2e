"""Using the adapter: `stages.summarize` on your own dialogues and `stages.export`'s merged folder, on the tiny model,
against what evaluate_adapter generates."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import TINY_MODEL, offline_params, stage_error_line

DIALOGUES = [
    "Anna: Lunch at 1?\nTom: Sure, see you at the usual place.",
    "Zoë: Can you feed the cat this weekend? I'm away until Sunday evening.\nJosé: Of course, leave the key.",
    "Mia: Running late, sorry!\nLeo: No worries, I'll order for you.",
]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A folder with the offline profile's params and an adapter whose update is not zero (a fresh LoRA adapter
    leaves the model unchanged, which would prove nothing)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("use")
    params = offline_params(eval={"max_new_tokens": 12, "batch_size": 2})
    params["model"]["base_model"] = str(TINY_MODEL)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    base = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    model.save_pretrained(root / "models/adapter")
    return root


@pytest.fixture(scope="module")
def evaluated(project) -> list[str]:
    """What evaluate_adapter's code path generates for DIALOGUES."""
    from samsum_qlora.data.prompt import generation_prompt_ids
    from samsum_qlora.evaluation.generation import generate, stop_token_ids
    from samsum_qlora.model.adapter import load_for_generation
    from samsum_qlora.model.loading import choose_device, load_tokenizer
    from samsum_qlora.params import load_params

    params = load_params(project / "params.yaml")
    policy = choose_device(params.quantization)
    tokenizer = load_tokenizer(params.model)
    model = load_for_generation(params, policy, str(project / "models/adapter"))
    prompts = [generation_prompt_ids(tokenizer, params.prompt.instruction, d, params.prompt.date_string)
               for d in DIALOGUES]
    stops = stop_token_ids(tokenizer, model, params.prompt.date_string)
    return [g.text for g in generate(model, tokenizer, prompts, params.eval.max_new_tokens, params.eval.batch_size,
                                     stops)]


@pytest.fixture(scope="module")
def predictions(project, evaluated) -> Path:
    """data/predictions/adapter.jsonl as evaluate_adapter writes it for DIALOGUES, each reference set to its
    prediction: a summary then scores 100 points of ROUGE-L against itself, unless it holds no word (rouge_score
    keeps only [a-z0-9] runs), and any summary the export changes scores less."""
    path = project / "data/predictions/adapter.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"id": f"t{i}", "dialogue": d, "reference": s, "prediction": s, "scores": {}}
            for i, (d, s) in enumerate(zip(DIALOGUES, evaluated, strict=True))]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_summarize_one_dialogue_from_a_file_or_stdin(project, evaluated, monkeypatch, capsys):
    from stages import summarize

    monkeypatch.chdir(project)
    (project / "one.txt").write_text(DIALOGUES[1] + "\n")
    summarize.main(["one.txt"])
    assert capsys.readouterr().out == evaluated[1] + "\n"
    summarize.main(["one.txt", "--base"])  # the untuned base says something else
    assert capsys.readouterr().out not in ("", evaluated[1] + "\n")
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO(DIALOGUES[2]))
    summarize.main(["-"])
    assert capsys.readouterr().out == evaluated[2] + "\n"


def test_summarize_many_keeps_ids_and_order(project, evaluated, monkeypatch, capsys):
    from stages import summarize

    monkeypatch.chdir(project)
    records = [{"id": f"d{i}", "dialogue": d} for i, d in enumerate(DIALOGUES)]
    (project / "many.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summarize.main(["many.jsonl", "-o", "out/summaries.jsonl"])
    written = [json.loads(line) for line in (project / "out/summaries.jsonl").read_text().splitlines()]
    assert written == [{**r, "summary": s} for r, s in zip(records, evaluated, strict=True)]
    (project / "many.json").write_text(json.dumps(DIALOGUES))  # a JSON list of plain strings
    summarize.main(["many.json"])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [p["summary"] for p in printed] == evaluated and [p["id"] for p in printed] == ["0", "1", "2"]


def test_summarize_names_a_dialogue_too_long_for_the_prompt(project, monkeypatch, caplog):
    import logging

    from stages import summarize

    monkeypatch.chdir(project)
    long = "\n".join(f"Tom: line {i} about the trip to the lake and who brings the tent" for i in range(60))
    records = [{"id": "short", "dialogue": DIALOGUES[0]}, {"id": "long", "dialogue": long}]
    (project / "long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    with caplog.at_level(logging.WARNING):
        summarize.main(["long.jsonl", "-o", "out/long.jsonl"])
    assert "dialogue long is longer than prompt.max_length (384 tokens with the prompt)" in caplog.text
    assert "dialogue short" not in caplog.text
    assert len((project / "out/long.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize(("name", "content", "message"), [
    ("missing.txt", None, "missing.txt does not exist: give a text file, a .json/.jsonl file, or - for stdin"),
    ("bad.jsonl", '{"dialogue": "A: hi"}\n{"dialogue": \n', "bad.jsonl:2: not valid JSON"),
    ("nokey.jsonl", '{"text": "A: hi"}\n', "nokey.jsonl:1: expected an object with a text 'dialogue' key"),
    ("empty.txt", "  \n", "empty.txt: dialogue 0 is empty; give the conversation text"),
    ("dict.json", '{"dialogue": "A: hi"}', "dict.json: expected a JSON list of dialogues"),
])
def test_summarize_bad_input_is_named(project, monkeypatch, name, content, message):
    from samsum_qlora.errors import PipelineError
    from stages.summarize import read_dialogues

    monkeypatch.chdir(project)
    if content is not None:
        (project / name).write_text(content)
    with pytest.raises(PipelineError) as err:
        read_dialogues(name, "dialogue", "id")
    assert str(err.value).startswith(message)


def test_export_writes_a_plain_transformers_model_that_generates_what_was_evaluated(project, evaluated,
                                                                                       predictions, monkeypatch):
    from transformers import AutoModelForCausalLM

    from samsum_qlora.data.prompt import generation_prompt_ids
    from samsum_qlora.evaluation.generation import generate, stop_token_ids
    from samsum_qlora.model.loading import load_tokenizer
    from samsum_qlora.params import load_params
    from stages import export

    monkeypatch.chdir(project)
    export.main(["--out", "merged32", "--dtype", "float32"])
    folder = project / "merged32"
    assert not (folder / "adapter_config.json").exists()
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    weights = load_file(folder / "model.safetensors")
    assert not any("lora" in name for name in weights) and {t.dtype for t in weights.values()} == {torch.float32}
    # Loaded with transformers alone, it generates the adapter's summaries.
    params = load_params()
    tokenizer = load_tokenizer(params.model.__class__(base_model=str(folder), tokenizer_type=None))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompts = [generation_prompt_ids(tokenizer, params.prompt.instruction, d, params.prompt.date_string)
               for d in DIALOGUES]
    stops = stop_token_ids(tokenizer, model, params.prompt.date_string)
    merged = generate(model, tokenizer, prompts, params.eval.max_new_tokens, params.eval.batch_size, stops)
    assert [g.text for g in merged] == evaluated

    # The export checked itself the same way, and recorded what it was checked against.
    rouge = self_rouge_l(evaluated)
    assert json.loads((folder / "export_check.json").read_text()) == {
        "examples": 3, "exact_matches": 3, "rougeL_export": rouge, "rougeL_evaluated": rouge,
        "rougeL_difference": 0.0, "max_rouge_drift": 0.5, "passed": True, "differing_ids": [],
        "dtype": "float32", "device": "cpu", "base_weights": "quantized", "adapter": "models/adapter",
        "adapter_sha256": sha256(project / "models/adapter/adapter_model.safetensors"),
        "predictions": "data/predictions/adapter.jsonl", "predictions_sha256": sha256(predictions)}

    export.main(["--no-check"])  # the default: models/merged, in the evaluation's dtype; unchecked, so no record
    assert export.export_dtype(params, "auto") == torch.float32  # the CPU computes in float32 (bf16 on a GPU)
    assert {t.dtype for t in load_file(project / "models/merged/model.safetensors").values()} == {torch.float32}
    export.main(["--no-check", "--dtype", "bfloat16"])
    assert {t.dtype for t in load_file(project / "models/merged/model.safetensors").values()} == {torch.bfloat16}
    assert (project / "models/merged/tokenizer.json").is_file()
    assert not (project / "models/merged/export_check.json").exists()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def self_rouge_l(summaries: list[str]) -> float:
    """The mean ROUGE-L, in points, of each summary against itself: 100 for one with a word, else 0."""
    return round(100 * sum(bool(re.search("[a-z0-9]", s.lower())) for s in summaries) / len(summaries), 4)


def test_a_damaged_merge_fails_the_check_and_leaves_the_previous_export(project, evaluated, predictions, monkeypatch,
                                                                        capsys):
    from stages import export

    monkeypatch.chdir(project)
    export.main(["--out", "shipped", "--dtype", "float32"])
    good = sha256(project / "shipped/model.safetensors")
    merge = export.merged_model

    def damaged_merge(*args, **kwargs) -> torch.nn.Module:
        model = merge(*args, **kwargs)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for weight in model.parameters():
                weight.add_(torch.randn(weight.shape, generator=generator) * weight.std())
        return model

    monkeypatch.setattr(export, "merged_model", damaged_merge)
    line = stage_error_line(capsys, lambda: export.main(["--out", "shipped", "--dtype", "float32"]))
    assert line.startswith("error: the merged model failed its check: ROUGE-L -")
    assert ("identical); shipped was left as it was and the rejected model is in shipped.rejected/ (see its "
            "export_check.json); if the adapter changed since its evaluation, run `dvc repro evaluate_adapter` "
            "first, or accept it with --max-rouge-drift or --no-check") in line
    assert sha256(project / "shipped/model.safetensors") == good
    assert json.loads((project / "shipped/export_check.json").read_text())["passed"] is True
    record = json.loads((project / "shipped.rejected/export_check.json").read_text())
    assert record["passed"] is False and record["exact_matches"] < 3
    assert record["rougeL_evaluated"] == self_rouge_l(evaluated) > 0
    assert record["rougeL_difference"] == pytest.approx(record["rougeL_export"] - record["rougeL_evaluated"], abs=1e-3)
    assert record["rougeL_difference"] < -0.5 and f"ROUGE-L {record['rougeL_difference']:+.2f} points" in line
    assert len(record["differing_ids"]) == 3 - record["exact_matches"]
    assert sha256(project / "shipped.rejected/model.safetensors") != good

    monkeypatch.setattr(export, "merged_model", merge)  # a sound export that passes clears the rejected one
    export.main(["--out", "shipped", "--dtype", "float32"])
    assert not (project / "shipped.rejected").exists()


def test_export_without_predictions_says_how_to_get_them(project, tmp_path, monkeypatch, capsys):
    from stages import export

    (tmp_path / "params.yaml").write_text((project / "params.yaml").read_text())
    (tmp_path / "models").mkdir()
    (tmp_path / "models/adapter").symlink_to(project / "models/adapter")
    monkeypatch.chdir(tmp_path)
    assert stage_error_line(capsys, lambda: export.main([])) == (
        "error: data/predictions/adapter.jsonl does not exist, so the export cannot be checked against the "
        "evaluation: run `dvc repro evaluate_adapter` first, or export with --no-check")
    assert stage_error_line(capsys, lambda: export.main(["--check-examples", "0"])) == (
        "error: --check-examples must be at least 1 and --max-rouge-drift at least 0 (--no-check skips the check)")
    assert not (tmp_path / "models/merged").exists()
    export.main(["--no-check", "--dtype", "float32"])
    assert (tmp_path / "models/merged/model.safetensors").is_file()
    assert not (tmp_path / "models/merged/export_check.json").exists()


def test_export_refuses_to_overwrite_the_adapter(project, monkeypatch):
    from samsum_qlora.errors import PipelineError
    from stages import export

    monkeypatch.chdir(project)
    with pytest.raises(PipelineError, match="is the adapter folder"):
        export.main(["--out", "models/adapter/"])
