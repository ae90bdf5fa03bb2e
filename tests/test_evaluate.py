import json
import logging

import pytest
import torch
import yaml

from conftest import TINY_MODEL, offline_params
from samsum_qlora.data.prompt import generation_prompt_ids
from samsum_qlora.evaluation.generation import Generation, _decode, generate, stop_token_ids, summarize_generations
from samsum_qlora.files import read_jsonl, write_jsonl

DATE = "26 Jul 2024"


@pytest.fixture(scope="module")
def tiny_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32).eval()


def test_decoding_stops_at_the_first_end_of_turn(tiny_tokenizer):
    eot = tiny_tokenizer.convert_tokens_to_ids("<|eot_id|>")
    words = tiny_tokenizer("Anna will call Tom.", add_special_tokens=False)["input_ids"]
    done = _decode(tiny_tokenizer, [*words, eot, *words], [eot])
    assert (done.text, done.new_tokens, done.stopped) == ("Anna will call Tom.", len(words), True)
    cut = _decode(tiny_tokenizer, words, [eot])
    assert (cut.text, cut.stopped) == ("Anna will call Tom.", False)
    assert _decode(tiny_tokenizer, [eot], [eot]).text == ""


def test_stop_ids_include_the_templates_end_of_turn(tiny_tokenizer, tiny_model):
    stops = stop_token_ids(tiny_tokenizer, tiny_model, DATE)
    assert stops[0] == tiny_tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert len(stops) == len(set(stops))


def test_batched_left_padded_generation_matches_one_at_a_time_and_holds_only_new_tokens(tiny_tokenizer, tiny_model):
    dialogues = [
        "Anna: Lunch at 1?\nTom: Sure.",
        "Zoë: Can you feed the cat this weekend? I'm away until Sunday evening.\nJosé: Of course, leave the key.",
        "Mia: Running late, sorry!",
    ]
    prompts = [generation_prompt_ids(tiny_tokenizer, "Summarize this dialogue.", d, DATE) for d in dialogues]
    stops = stop_token_ids(tiny_tokenizer, tiny_model, DATE)
    batched = generate(tiny_model, tiny_tokenizer, prompts, max_new_tokens=12, batch_size=3, stop_ids=stops)
    for prompt, result in zip(prompts, batched, strict=True):
        with torch.no_grad():
            out = tiny_model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=stops,
                                      pad_token_id=tiny_tokenizer.pad_token_id)
        expected = _decode(tiny_tokenizer, out[0, len(prompt):].tolist(), stops)
        assert result == expected
        assert "Summarize" not in result.text and result.new_tokens <= 12


def test_generation_attention_never_takes_the_cudnn_kernel(tiny_tokenizer, tiny_model, monkeypatch):
    """cuDNN's attention builds a plan for every new shape, i.e. at every decoding step: generation runs with it
    switched off (and only generation: the switch is restored afterwards)."""
    import torch.nn.functional as F

    seen = []
    sdpa = F.scaled_dot_product_attention

    def recording(*args, **kwargs):
        seen.append((torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled()))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    before = torch.backends.cuda.cudnn_sdp_enabled()
    prompts = [generation_prompt_ids(tiny_tokenizer, "Summarize this dialogue.", d, DATE)
               for d in ("Anna: Lunch at 1?\nTom: Sure.", "Mia: Running late, sorry!")]
    generate(tiny_model, tiny_tokenizer, prompts, max_new_tokens=3, batch_size=2, stop_ids=[-1])
    assert seen and set(seen) == {(False, True)}
    assert torch.backends.cuda.cudnn_sdp_enabled() == before


def test_metrics_count_the_shortened_prompts():
    generations = [Generation("Anna will call.", 4, True, prompt_shortened=True), Generation("Tom is late.", 4, True),
                   Generation("Bo agrees.", 3, True, prompt_shortened=True)]
    _, metrics = summarize_generations(generations, ["Anna will call.", "Tom is late.", "Bo agrees."], seconds=1.0)
    assert metrics["shortened_prompts"] == 2 and metrics["examples"] == 3


def test_the_evaluate_stage_shortens_a_test_dialogue_too_long_for_the_prompt_and_counts_it(tmp_path, monkeypatch,
                                                                                          caplog):
    from stages.evaluate import evaluate

    # Longer than prompt.max_length and than the tokenizer's own model_max_length (1024), whose warning stays silent.
    long = "\n".join(f"Tom: line {i} about the trip to the lake and who brings the tent" for i in range(120))
    rows = [{"id": "a", "dialogue": "Anna: Lunch at 1?\nTom: Sure.", "summary": "Anna and Tom will have lunch."},
            {"id": "b", "dialogue": long, "summary": "Tom talks about the trip."},
            {"id": "c", "dialogue": "Mia: Running late, sorry!", "summary": "Mia is late."}]
    params = offline_params(model={"base_model": str(TINY_MODEL)}, prompt={"max_length": 96},
                            eval={"max_new_tokens": 4, "batch_size": 2})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    write_jsonl(tmp_path / "data/prepared/test.jsonl", rows)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(logging.getLogger("transformers"), "propagate", True)
    with caplog.at_level(logging.INFO):
        evaluate("baseline")
    metrics = json.loads((tmp_path / "metrics/baseline.json").read_text())
    assert metrics["shortened_prompts"] == 1 and metrics["examples"] == 3
    predictions = read_jsonl(tmp_path / "data/predictions/baseline.jsonl")
    assert [p["prompt_shortened"] for p in predictions] == [False, True, False]
    assert "1 of 3 dialogues are longer than prompt.max_length (96 tokens with the prompt)" in caplog.text
    assert "Token indices" not in caplog.text
