import dataclasses
from pathlib import Path

import pytest
import yaml

from samsum_qlora.errors import PipelineError
from samsum_qlora.params import Params, load_params, parse_params
from samsum_qlora.params_text import fields_of, reference_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_params_are_the_default_job():
    params = Params()  # the schema's defaults; the next test checks that params.yaml holds the same
    assert params.model.base_model == "meta-llama/Llama-3.2-1B-Instruct"
    assert params.quantization.use_4bit and params.quantization.bnb_4bit_quant_type == "nf4"
    assert params.quantization.bnb_4bit_use_double_quant and params.quantization.bnb_4bit_compute_dtype == "bfloat16"
    assert (params.lora.r, params.lora.lora_alpha, params.lora.target_modules) == (8, 16, ["q_proj", "v_proj"])
    assert params.lora.lora_dropout == 0.05
    t = params.training
    # The tutorial's 4 x 4 as one pass: 16 sequences per step, the same token-mean loss.
    assert t.per_device_train_batch_size * t.gradient_accumulation_steps == 16 and t.num_train_epochs == 1
    assert (t.learning_rate, t.logging_steps, t.save_steps, t.eval_steps) == (2e-4, 10, 100, 100)
    assert (t.warmup_ratio, t.warmup_steps) == (0.054, None)  # 50 of the default job's 921 steps
    assert t.optim == "paged_adamw_8bit"
    assert params.data.source == "knkarthick/samsum"


def _leaves(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        out.update(_leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return out


def test_committed_params_yaml_holds_the_schema_defaults():
    # The one test that reads the workspace's params.yaml: the file a clone gets must be the schema's defaults.
    shipped = _leaves(yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8")))
    defaults = _leaves(dataclasses.asdict(Params()))
    for key in [*defaults, *(k for k in shipped if k not in defaults)]:
        in_file, default = shipped.get(key, "(missing)"), defaults.get(key, "(not in the schema)")
        same_type = type(in_file) is type(default) or (type(default), type(in_file)) == (float, int)
        assert in_file == default and same_type, (
            f"params.yaml differs from the schema defaults at {key}: {in_file!r} in the file, {default!r} in "
            "samsum_qlora/params.py. If you applied an experiment, `git checkout params.yaml`; if you meant to "
            "change the default, change it in both (and regenerate docs/params.md)")
    assert list(shipped) == list(defaults), "params.yaml lists its keys in another order than samsum_qlora/params.py"


def test_docs_params_md_is_generated_from_the_schema():
    committed = (ROOT / "docs" / "params.md").read_text(encoding="utf-8")
    assert committed == reference_markdown(Params), (
        "docs/params.md is out of date: `python -m samsum_qlora.params --markdown > docs/params.md`")


def test_every_key_says_what_it_does():
    sections = [Params, *(f.annotation for f in fields_of(Params).values() if dataclasses.is_dataclass(f.annotation))]
    for section in sections:
        for name, field in fields_of(section).items():
            assert field.description, f"{section.__name__}.{name} has no description"


def test_params_stay_plain_dataclasses():
    # The stages and benchmarks change params with dataclasses.replace and hash them with asdict (resume).
    params = parse_params({"lora": {"r": 4}})
    changed = dataclasses.replace(params, training=dataclasses.replace(params.training, max_steps=3))
    assert changed.training.max_steps == 3 and changed.lora.r == 4 and params.training.max_steps == -1
    assert dataclasses.asdict(changed)["lora"]["target_modules"] == ["q_proj", "v_proj"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.seed = 1


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"lora": {"rnak": 1, "r": 0}}, "params.yaml: unknown key lora.rnak; did you mean lora.r?"),
        ({"lora": {"r": 0, "rnak": 1}}, "params.yaml: lora.r is 0; expected an integer > 0"),
        ({"lora": {"target_modules": ["q_proj", ""]}}, "lora.target_modules is ['q_proj', '']; expected a non-empty"),
        ({"lora": {"target_modules": ["", 3]}}, "lora.target_modules[1] is 3 (int); expected a string"),
        ({"training": {"max_steps": "x"}}, "training.max_steps is 'x' (str); expected an integer"),
        ({"training": {"max_steps": True}}, "training.max_steps is True (bool); expected an integer"),
        ({"training": {"save_strategy": 5}}, "training.save_strategy is 5 (int); expected a string"),
        ({"training": {"max_memory_gib": 1}}, "training.max_memory_gib is 1.0; expected null (the GPU's memory) or "
                                              "a number of GiB > 1 (e.g. 16)"),
        ({"eval": {"max_samples": 1.5}}, "eval.max_samples is 1.5 (float); expected an integer"),
        ({"data": {"source": ""}}, "data.source is ''; expected a hub dataset id or a local path"),
        (["seed"], "params.yaml: the file must be a mapping of keys, got ['seed']"),
    ],
)
def test_the_first_problem_in_the_file_is_the_one_reported(raw, message):
    with pytest.raises(PipelineError) as err:
        parse_params(raw)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_an_empty_section_takes_its_defaults():
    assert parse_params({"model": None, "eval": {}}) == Params()
    assert parse_params(None) == Params()


def test_missing_keys_take_defaults_and_numbers_coerce():
    params = parse_params({"training": {"learning_rate": "2e-4", "num_train_epochs": 2}})
    assert params.training.learning_rate == pytest.approx(2e-4)
    assert params.training.num_train_epochs == 2.0
    assert params.lora == Params().lora


def test_single_target_module_from_the_cli_becomes_a_list():
    assert parse_params({"lora": {"target_modules": "q_proj"}}).lora.target_modules == ["q_proj"]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"lora": {"rank": 4}}, "unknown key lora.rank; did you mean lora.r?"),
        ({"trainig": {}}, "unknown key trainig; did you mean training?"),
        ({"lora": {"zzz": 1}}, "unknown key lora.zzz; known keys of lora: r, lora_alpha, target_modules, lora_dropout"),
        ({"lora": {"r": "8"}}, "lora.r is '8' (str); expected an integer"),
        ({"lora": {"r": 0}}, "lora.r is 0; expected an integer > 0"),
        ({"lora": {"r": 2.5}}, "lora.r is 2.5 (float); expected an integer"),
        ({"lora": {"lora_dropout": 1.0}}, "lora.lora_dropout is 1.0; expected a number in [0, 1)"),
        ({"lora": {"lora_dropout": -0.1}}, "lora.lora_dropout is -0.1; expected a number in [0, 1)"),
        ({"lora": {"target_modules": []}}, "lora.target_modules is []; expected a non-empty list"),
        ({"lora": {"target_modules": [1]}}, "lora.target_modules[0] is 1 (int); expected a string"),
        ({"training": {"learning_rate": 0}}, "training.learning_rate is 0.0; expected a number > 0"),
        ({"training": {"learning_rate": "fast"}}, "training.learning_rate is 'fast' (str); expected a number"),
        ({"training": {"max_steps": 0}}, "training.max_steps is 0; expected -1 (use num_train_epochs)"),
        ({"training": {"save_strategy": "always"}}, "training.save_strategy is 'always'; expected one of steps"),
        ({"quantization": {"bnb_4bit_quant_type": "int4"}}, "bnb_4bit_quant_type is 'int4'; expected one of nf4, fp4"),
        ({"quantization": {"bnb_4bit_compute_dtype": "fp8"}}, "bnb_4bit_compute_dtype is 'fp8'; expected one of"),
        ({"quantization": {"use_4bit": "yes"}}, "quantization.use_4bit is 'yes' (str); expected true/false"),
        ({"eval": {"max_new_tokens": 0}}, "eval.max_new_tokens is 0; expected an integer > 0"),
        ({"eval": {"max_new_tokens": -5}}, "eval.max_new_tokens is -5; expected an integer > 0"),
        ({"data": {"train_samples": 0}}, "data.train_samples is 0; expected null (all rows) or an integer > 0"),
        ({"prompt": {"max_length": 8}}, "prompt.max_length is 8; expected an integer >= 16"),
        ({"model": "llama"}, "model must be a mapping of keys"),
        ({"seed": None}, "seed is None (NoneType); expected an integer"),
    ],
)
def test_bad_params_name_the_key_and_what_is_accepted(raw, message):
    with pytest.raises(PipelineError) as err:
        parse_params(raw)
    text = str(err.value)
    assert text.startswith("params.yaml: ")
    assert message in text
    assert "\n" not in text


def test_unreadable_yaml_is_one_line(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("lora: [r: 8\n")
    with pytest.raises(PipelineError, match=r"not valid YAML") as err:
        load_params(bad)
    assert "\n" not in str(err.value)


def test_an_unknown_key_says_to_rename_or_remove_it_in_the_file():
    """DVC's own hint for `-S lora.rr=16` is `+lora.rr=16`, which writes the key into params.yaml: the stage that
    then meets it says where the fix is."""
    with pytest.raises(PipelineError) as err:
        parse_params({"lora": {"rr": 16}})
    assert str(err.value).endswith("; rename or remove it in params.yaml")
    assert "did you mean lora.r?" in str(err.value)
