"""Smoke tests of the benchmark suite on CPU: the length model, the random Llama, the SAMSum-size dataset, and the
benchmarks in --tiny form."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks import (
    bench_compile,
    bench_determinism,
    bench_eval,
    bench_host_link,
    bench_loop,
    bench_memory,
    bench_small_data,
    bench_train,
    card_plans,
    check_packed,
    profile_generate,
    profile_train,
)
from benchmarks.harness import dvc_queue, dvc_runs, setups, stage_runs
from benchmarks.harness.dataset import build_splits, template_lengths
from benchmarks.harness.lengths import (
    IGNORE_INDEX,
    SAMSUM,
    examples_for,
    ordinary_token_ids,
    prompts_of,
    sample_lengths,
)
from benchmarks.harness.overrides import parse_overrides
from benchmarks.harness.shapes import SHAPES, build_llama_1b_shaped, default_tokenizer_dir
from conftest import TINY_MODEL
from samsum_qlora.params import Params, PromptParams

HEADER_KEYS = {"benchmark", "date", "device", "gpus", "versions", "peak_memory", "source", "config", "results"}


@pytest.fixture(autouse=True)
def committed_params(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # The benchmarks measure params.yaml's values; here the schema's defaults, not an experiment left in the workspace.
    path = tmp_path_factory.mktemp("params") / "params.yaml"
    path.write_text(yaml.safe_dump(dataclasses.asdict(Params()), sort_keys=False), encoding="utf-8")
    for module in (bench_eval, bench_loop, bench_memory, setups, stage_runs):
        monkeypatch.setattr(module, "PROJECT_PARAMS", path)


@pytest.fixture(scope="module")
def bench_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if (TINY_MODEL / "tokenizer_config.json").is_file():
        return TINY_MODEL
    return default_tokenizer_dir(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture
def one_thread():
    # The smoke tests share small CI runners: one thread avoids the stalls of oversubscribed OpenMP threads.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_lengths_follow_samsum_and_are_deterministic():
    pairs = sample_lengths(5000, seed=3)
    totals = [t for t, _ in pairs]
    assert pairs == sample_lengths(5000, seed=3)
    assert pairs != sample_lengths(5000, seed=4)
    assert min(totals) >= SAMSUM.min_length and max(totals) <= SAMSUM.max_length
    assert 205 <= statistics.fmean(totals) <= 222  # 214 before clipping the long tail at 512
    assert 85 <= statistics.pstdev(totals) <= 115
    fraction = sum(s for _, s in pairs) / sum(totals)
    assert 0.14 <= fraction <= 0.16
    assert all(SAMSUM.min_summary <= s < t for t, s in pairs)


def test_examples_mask_all_but_the_summary(bench_tokenizer: Path):
    tokenizer = AutoTokenizer.from_pretrained(str(bench_tokenizer))
    examples = examples_for(tokenizer, 50, seed=1)
    assert examples == examples_for(tokenizer, 50, seed=1)
    ordinary = set(ordinary_token_ids(tokenizer))
    assert tokenizer.pad_token_id not in ordinary
    for ex, prompt in zip(examples, prompts_of(examples), strict=True):
        ids, labels = ex["input_ids"], ex["labels"]
        assert len(ids) == len(labels)
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert set(ids[1:-1]) <= ordinary
        n = len(prompt)
        assert labels[:n] == [IGNORE_INDEX] * n and labels[n:] == ids[n:] and ids[:n] == prompt


def test_llama_shaped_model_loads_offline(tmp_path: Path, bench_tokenizer: Path):
    out = build_llama_1b_shaped(tmp_path / "m", bench_tokenizer, vocab_size=2048, layers=2, hidden=64, heads=4)
    model = AutoModelForCausalLM.from_pretrained(str(out))
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.head_dim, config.num_key_value_heads) == (2, 64, 16, 4)
    assert config.intermediate_size == 8192 and config.tie_word_embeddings
    assert config.rope_parameters["rope_type"] == "llama3" and config.rope_parameters["factor"] == 32.0
    assert model.dtype == torch.bfloat16
    assert tokenizer.pad_token_id == config.pad_token_id and tokenizer.chat_template
    weights = next(out.glob("*.safetensors")).read_bytes()
    again = build_llama_1b_shaped(tmp_path / "n", bench_tokenizer, vocab_size=2048, layers=2, hidden=64, heads=4)
    assert next(again.glob("*.safetensors")).read_bytes() == weights  # seeded


@pytest.mark.parametrize("name, published", [("135M", 134_515_008), ("1B", 1_235_814_400), ("3B", 3_212_749_824),
                                             ("8B", 8_030_261_248)])
def test_shapes_have_the_hub_models_parameter_counts(name: str, published: int, bench_tokenizer: Path):
    # SmolLM2-135M-Instruct, Llama-3.2-1B, Llama-3.2-3B and Llama-3.1-8B as the hub's safetensors metadata counts
    # them; built on the meta device, so nothing is allocated.
    shape = SHAPES[name]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(shape.config(AutoTokenizer.from_pretrained(str(bench_tokenizer))))
    assert shape.parameters() == published
    assert sum(p.numel() for p in model.parameters()) == published  # tied embeddings are counted once
    assert model.config.tie_word_embeddings == (name != "8B")
    assert (model.config.rope_parameters["rope_type"] == "default") == (name == "135M")  # no Llama 3 scaling


def _read_report(out_dir: Path, benchmark: str) -> dict:
    (path,) = out_dir.glob(f"{benchmark}-*-tiny-*.json")
    report = json.loads(path.read_text())
    assert report.keys() >= HEADER_KEYS
    assert report["benchmark"] == benchmark and report["versions"]["torch"]
    return report


def test_profile_generate_tiny(tmp_path: Path, bench_tokenizer: Path, one_thread: None):
    out = profile_generate.main(["--tiny", "--examples", "10", "--max-new-tokens", "3", "--batch-sizes", "4,10",
                                 "--out", str(tmp_path / "out"), "--model-dir", str(tmp_path / "model"),
                                 "--tokenizer", str(bench_tokenizer)])
    report = _read_report(tmp_path / "out", "profile-generate")
    assert report == out
    rows, profiled = report["results"]["batch_sizes"], report["results"]["profile"]
    assert [(r["batch_size"], r["batches"], r["new_tokens"]) for r in rows] == [(4, 3, 3), (10, 1, 3)]
    assert all(r["generate_s"] > 0 and r["prefill_s"] > 0 for r in rows)
    assert profiled["batch_size"] == 4 and profiled["top_ops"]


def test_profile_train_tiny_writes_its_profile(tmp_path: Path, bench_tokenizer: Path, one_thread: None):
    profile_train.main(["--tiny", "--set", "training.max_tokens_per_micro_batch=512", "--label", "cap",
                        "--out", str(tmp_path / "out"), "--model-dir", str(tmp_path / "model"),
                        "--tokenizer", str(bench_tokenizer)])
    report = _read_report(tmp_path / "out", "profile-train")
    assert [p.name.endswith("-cap.json") for p in (tmp_path / "out").iterdir()] == [True]
    config, results = report["config"], report["results"]
    assert config["shape"] == "tiny" and config["overrides"] == {"training": {"max_tokens_per_micro_batch": 512}}
    assert config["settings"]["collator"] == "FlatCollator" and config["profiled_steps"] == profile_train.ACTIVE
    assert results["wall_s"] > 0 and results["top_cpu_ops"] and results["gpu_busy_s_per_profiled_step"] is None
    assert all(op["self_cpu_ms"] >= 0 and op["count"] > 0 for op in results["top_cpu_ops"])


def test_bench_eval_tiny(tmp_path: Path, bench_tokenizer: Path, one_thread: None):
    bench_eval.main(["--tiny", "--examples", "12", "--one-at-a-time", "2", "--max-new-tokens", "4", "--batch-size", "8",
                     "--out", str(tmp_path / "out"), "--model-dir", str(tmp_path / "model"),
                     "--tokenizer", str(bench_tokenizer), "--label", "batch8"])
    assert [p.name.endswith("-batch8.json") for p in (tmp_path / "out").iterdir()] == [True]
    report = _read_report(tmp_path / "out", "eval")
    single, straight, project = report["results"]
    assert (single["setup"], straight["setup"], project["setup"]) == ("one_at_a_time", "4bit_batched", "project")
    assert single["extrapolated"] and single["timed_examples"] == 2 and not project["extrapolated"]
    assert project["batch_size"] == 8 and project["dequantize"] and not straight["dequantize"]
    assert straight["timed_examples"] == 8 and straight["extrapolated"]
    assert 0 <= project["same_text_as_4bit"] <= 1
    for result in (single, straight, project):
        assert result["all_full_length"] and result["new_tokens_mean"] == 4
        for key in ("seconds_per_example", "wall_seconds", "load_seconds", "peak_memory_gib", "speedup"):
            assert result[key] > 0
    assert project["wall_seconds"] >= project["load_seconds"] + project["generate_seconds"] - 0.01
    assert report["config"]["target_wall_seconds"] == 30.0
    assert [r["within_target"] for r in report["results"]] == [r["wall_seconds"] <= 30.0 for r in report["results"]]


def test_bench_eval_judges_each_shape_by_its_own_goal():
    rows = [{"wall_seconds": 45.0}, {"wall_seconds": 61.0}]
    assert [r["within_target"] for r in bench_eval.judged([dict(r) for r in rows], "8B")] == [True, False]
    assert [r["within_target"] for r in bench_eval.judged([dict(r) for r in rows], "1B")] == [False, False]
    assert [r["within_target"] for r in bench_eval.judged([dict(r) for r in rows], "3B")] == [None, None]


def test_bench_train_tiny(tmp_path: Path, bench_tokenizer: Path, one_thread: None):
    bench_train.main(["--tiny", "--setups", "tutorial,project", "--steps", "2", "--warmup", "1",
                      "--out", str(tmp_path / "out"), "--model-dir", str(tmp_path / "model"),
                      "--tokenizer", str(bench_tokenizer), "--label", "two-setups"])
    assert [p.name.endswith("-two-setups.json") for p in (tmp_path / "out").iterdir()] == [True]
    report = _read_report(tmp_path / "out", "train")
    assert report["failed"] == [] and report["config"]["steps"] == 2 and report["config"]["shape"] == "tiny"
    tutorial, project = report["results"]
    assert (tutorial["setup"], project["setup"]) == ("tutorial", "project")
    assert tutorial["ratio_to_tutorial"] == 1.0
    for result in (tutorial, project):
        assert result["timed_steps"] == 2 and result["sequences_per_step"] == 16
        for key in ("tokens_per_second", "peak_memory_gib", "timed_seconds", "ratio_to_tutorial", "real_tokens"):
            assert result[key] > 0
        assert math.isfinite(result["final_loss"]) and 0.1 < result["loss_token_fraction"] < 0.25
    # Same examples in the same order: the same tokens, and the same summary tokens carry loss.
    assert tutorial["real_tokens"] == project["real_tokens"]
    assert tutorial["loss_tokens"] == project["loss_tokens"]
    assert tutorial["padding_fraction"] > 0.1  # padding to the longest of 4 uneven examples


def test_bench_compile_tiny(tmp_path: Path):
    bench_compile.main(["--tiny", "--ranks", "8,16", "--variants", "static-rank", "--steps", "1", "--warmup", "1",
                        "--out", str(tmp_path)])
    report = _read_report(tmp_path, "compile")
    rows = report["results"]
    assert [(r["variant"], r["rank"], r["cache"]) for r in rows] == [("static-rank", 8, "cold"),
                                                                       ("static-rank", 16, "warm")]
    for row in rows:
        assert "error" not in row, row
        assert row["process_seconds"] > 0 and row["tokens_per_second"] > 0 and math.isfinite(row["final_loss"])
        # The train stage compiles on CUDA only: on CPU nothing is compiled, so nothing is counted.
        assert row["graphs"] == 0 and row["compile_seconds"] == 0 and row["fx_graph_cache"] == {"hit": 0, "miss": 0}


def test_bench_memory_tiny(tmp_path: Path, one_thread: None):
    bench_memory.main(["--tiny", "--caps", "null,1024", "--checkpointing", "--out", str(tmp_path)])
    report = _read_report(tmp_path, "memory")
    tokens = report["config"]["step_tokens"]
    assert len(tokens) == 2 * bench_memory.STEPS_PER_KIND
    assert sum(tokens[bench_memory.STEPS_PER_KIND:]) > 1.2 * sum(tokens[:bench_memory.STEPS_PER_KIND])  # heavy
    whole, capped, checkpointed = report["results"]
    assert [r["setting"] for r in report["results"]] == ["cap null", "cap 1024", "checkpointing, no cap"]
    assert whole["passes_typical"] == whole["passes_heavy"] == checkpointed["passes_heavy"] == 1
    assert capped["passes_heavy"] > capped["passes_typical"] > 1  # heavier steps are cut into more passes
    for result in report["results"]:
        assert result["tokens_per_s_typical"] > 0 and result["tokens_per_s_heavy"] > 0


def test_overrides_nest_and_parse_values():
    assert parse_overrides(["training.padding_free=false", "lora.target_modules=[q_proj,k_proj]"]) == {
        "training": {"padding_free": False}, "lora": {"target_modules": ["q_proj", "k_proj"]}}


def test_check_packed_compares_packed_and_padded_against_float32(tmp_path, capsys, one_thread):
    assert check_packed.main(["--tiny", "--examples", "4", "--model-dir", str(tmp_path / "model")]) == 0
    out = capsys.readouterr().out
    assert "cpu (one SDPA per example), 4 examples" in out
    assert "padded float32" in out and "packed" in out and out.rstrip().endswith("OK")


def test_samsum_size_rows_have_samsum_lengths_through_the_template(bench_tokenizer: Path):
    tokenizer = AutoTokenizer.from_pretrained(str(bench_tokenizer))
    prompt = PromptParams()
    sizes = {"train": 600, "validation": 3, "test": 3}
    splits = build_splits(tokenizer, prompt.instruction, prompt.date_string, sizes, seed=1)
    assert {split: len(rows) for split, rows in splits.items()} == sizes
    assert splits == build_splits(tokenizer, prompt.instruction, prompt.date_string, sizes, seed=1)
    rows = splits["train"]
    assert len({r["id"] for r in rows}) == len({r["dialogue"] for r in rows}) == 600
    assert all(r["dialogue"].strip() and r["summary"].strip() and ": " in r["dialogue"] for r in rows)
    stats = template_lengths(tokenizer, rows, prompt.instruction, prompt.date_string)
    assert 198 <= stats["length_mean"] <= 228  # SAMSum's 214 (213 once clipped at 512), as benchmarks.harness.lengths
    assert 80 <= stats["length_sd"] <= 120 and stats["length_min"] >= 40 and stats["length_max"] <= 540
    assert 0.12 <= stats["summary_token_fraction"] <= 0.19


def test_queue_workers_follow_the_memory_rule(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setattr(dvc_queue.os, "cpu_count", lambda: 16)
    monkeypatch.setattr(dvc_queue.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dvc_queue.torch.cuda, "mem_get_info", lambda: (100 * 2**30, 140 * 2**30))
    # a run: 7.6 GiB x 1.25 + 1 GiB = 10.5 GiB; 100 GiB hold 9 of them, but 16 cores feed at most 8
    assert dvc_queue.default_jobs(7.6, 9)[0] == 8
    assert dvc_queue.default_jobs(7.6, 4)[0] == 4
    monkeypatch.setattr(dvc_queue.torch.cuda, "mem_get_info", lambda: (30 * 2**30, 140 * 2**30))
    jobs, rule = dvc_queue.default_jobs(7.6, 9)
    assert jobs == 2 and "30.0 GiB free" in rule
    job = {"stages": [{"stage": "train", "peak_gpu_gib": 5.8}, {"stage": "evaluate_adapter", "peak_gpu_gib": 8.5},
                      {"stage": "prepare", "peak_gpu_gib": None}]}
    assert dvc_queue.run_peak_gib(job, Path("nowhere")) == 8.5  # the largest stage, not just train
    earlier = tmp_path / "stage-timings.jsonl"  # a job run by an earlier call: its recorded stage processes
    earlier.write_text("\n".join(json.dumps({"argv": [f"/p/stages/{m}.py"], "peak_gpu_gib": g}) for m, g in
                                 (("train", 8.52), ("evaluate", 14.45), ("prepare", None))) + "\n")
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/train.json").write_text(json.dumps({"peak_memory_gib": 8.52}))
    assert dvc_queue.run_peak_gib(None, tmp_path, earlier) == 14.45
    assert dvc_queue.run_peak_gib(None, tmp_path, tmp_path / "none.jsonl") == 8.52
    monkeypatch.setattr(dvc_queue.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dvc_queue.os, "cpu_count", lambda: 2)
    assert dvc_queue.default_jobs(None, 9)[0] == 1
    assert dvc_queue.grid_size(bench_loop.GRID) == 9


def test_sweep_wait_stops_at_the_timeout_and_says_what_finished(monkeypatch: pytest.MonkeyPatch):
    rows = [{"task": "1", "name": "a", "status": "Success"}, {"task": "2", "name": "b", "status": "Running"}]
    monkeypatch.setattr(dvc_queue, "queue_status", lambda project, env: rows)
    started = dvc_queue.time.time() - 3
    final, finished_at, emptied = dvc_queue.wait_for_queue(Path("nowhere"), {}, 1.0, started, poll=0)
    assert final == rows and not emptied and finished_at.keys() == {"a"} and finished_at["a"] >= 3
    rows[1]["status"] = "Failed"
    assert dvc_queue.wait_for_queue(Path("nowhere"), {}, 1.0, started, poll=0)[2]


def test_a_sweep_cut_off_keeps_what_it_measured(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A time limit hits while waiting for the queue: the workers, and the train stages that had ended (when each
    started and ended, so overlapping runs show), are still reported."""
    timings = tmp_path / "timings.jsonl"
    log_file = tmp_path / "sweep.log"
    log_file.write_text("Queued experiment 'a' for future execution.\nQueued experiment 'b' for future execution.\n")
    monkeypatch.setattr(dvc_queue, "timed_dvc", lambda *a: dvc_runs.DvcRun([], 1.5, 0, 0.0))
    monkeypatch.setattr(dvc_queue, "run_dvc", lambda *a, **k: None)
    stopped = []
    monkeypatch.setattr(dvc_queue, "stop_queue", lambda project, env, running: stopped.append(running) or [])

    def start_queue(project, env, jobs, log_file):  # two train stages run, overlapping, and end
        now = dvc_queue.time.time()
        with open(timings, "a", encoding="utf-8") as out:
            for start, end in ((now + 1, now + 10), (now + 2, now + 12)):
                row = {"argv": ["/w/stages/train.py"], "start": start, "end": end, "compile": None}
                out.write(json.dumps(row) + "\n")

    def wait_for_queue(*args):
        raise KeyboardInterrupt("signal 15")

    monkeypatch.setattr(dvc_queue, "start_queue", start_queue)
    monkeypatch.setattr(dvc_queue, "wait_for_queue", wait_for_queue)
    measured: dict = {}
    with pytest.raises(KeyboardInterrupt):
        dvc_queue.run_sweep(tmp_path, {"SAMSUM_BENCH_TIMINGS": str(timings)}, ["lora.r=4,16"], 2, None, log_file,
                            60.0, measured)
    assert measured["jobs"] == 2 and measured["experiments_expected"] == 2 and measured["queue_seconds"] == 1.5
    spans = [(p["start_s"], p["end_s"], p["process_s"]) for p in measured["train_processes"]]
    assert [(round(a), round(b), c) for a, b, c in spans] == [(1, 10, 9.0), (2, 12, 10.0)]
    assert "queue_emptied" not in measured  # never seen
    assert stopped == [[]]  # the workers are stopped even so; what runs is unknown, so nothing is killed


def test_stopping_the_queue_is_bounded_in_time(monkeypatch: pytest.MonkeyPatch):
    calls = []

    def run(args, **kwargs):
        calls.append(args[1:3])
        if args[2] == "kill":
            raise dvc_queue.subprocess.TimeoutExpired(args, kwargs["timeout"])

    monkeypatch.setattr(dvc_queue.subprocess, "run", run)
    assert dvc_queue.stop_queue(Path("p"), {}, ["a", "b"], timeout=7) == ["dvc queue kill did not return within 7 s"]
    assert calls == [["queue", "stop"], ["queue", "kill"]]
    calls.clear()
    assert dvc_queue.stop_queue(Path("p"), {}, []) == [] and calls == [["queue", "stop"]]


@pytest.mark.slow
def test_bench_loop_tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two queued runs share the runner's cores
    common = ["--tiny", "--workdir", str(tmp_path / "work"), "--model-dir", str(tmp_path / "model"),
              "--data-dir", str(tmp_path / "data")]
    out = bench_loop.main([*common, "--parts", "job,rerun", "--out", str(tmp_path / "out")])
    report = _read_report(tmp_path / "out", "loop")
    assert report["failed"] == [] and report["results"].keys() == {"job", "rerun"}
    assert not report["config"]["reused_job"]
    assert report["source"]["commit"] and report["tools"]["dvc"] and report == json.loads(json.dumps(out))
    # Beside the results, the stage timings they were computed from: one line per process, the train stage's too.
    timed = [json.loads(line) for path in (tmp_path / "out").glob("loop-*-stage-timings.jsonl")
             for line in path.read_text(encoding="utf-8").splitlines()]
    assert any(row["argv"][-1].endswith("train.py") for row in timed), timed
    # A second call with the same --workdir starts from that job (its baseline evaluation stays cached).
    bench_loop.main([*common, "--parts", "sweep,search", "--grid", "lora.r=4,16", "--jobs", "2",
                     "--out", str(tmp_path / "out2")])
    second = _read_report(tmp_path / "out2", "loop")
    assert second["failed"] == [] and second["config"]["reused_job"]
    assert second["results"].keys() == {"sweep", "search"}
    search = second["results"]["search"]  # the same grid through stages.search: one experiment per trial
    assert search["returncode"] == 0 and search["states"] == {"complete": 2} and not search["timed_out"]
    assert search["experiments_shown"] == ["grid-0", "grid-1"] and len(search["trains"]) == 2
    assert sorted(t["params"]["lora.r"] for t in search["trials"]) == [4, 16]
    assert search["best"]["value"] == max(t["value"] for t in search["trials"])
    job, rerun, sweep = report["results"]["job"], report["results"]["rerun"], second["results"]["sweep"]
    assert sorted(job["ran"]) == sorted(dvc_runs.MODULES) and job["skipped"] == []
    for row in job["stages"]:  # DVC's time for a stage holds its process, which the timer hook measured
        assert row["process_s"] > 0 and row["wall_s"] >= row["process_s"] - 0.2, row
    assert sum(row["wall_s"] for row in job["stages"]) <= job["wall_s"]
    train = next(row for row in job["stages"] if row["stage"] == "train")
    assert train["steps"] == 4 and 0 < train["work_s"] < train["process_s"]
    assert job["tokens"]["train"]["examples"] == 96
    assert rerun["ran"] == ["train", "evaluate_adapter", "compare", "card"]
    assert sorted(rerun["skipped"]) == ["evaluate_baseline", "prepare", "tokenize_mask"]
    assert sweep["experiments_expected"] == 2 and sweep["all_listed_with_metrics"] and sweep["jobs"] == 2
    assert sorted(e["lora.r"] for e in sweep["experiments"]) == [4, 16]
    assert set(sweep["queue_status"].values()) == {"Success"} and len(sweep["train_processes"]) == 2
    assert sweep["queue_emptied"] and all(0 < e["finished_after_s"] <= sweep["wall_s"] + 1
                                          for e in sweep["experiments"])
    with pytest.raises(SystemExit, match="exists: run the job part in an empty --workdir"):
        bench_loop.main([*common, "--parts", "job", "--out", str(tmp_path / "out3")])


def test_the_readmes_card_table_is_what_the_memory_plans_choose():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    table = card_plans.table()
    assert table in readme
    # The 8B base on a 24 GB card: only checkpointing per pass lets its heaviest step fit.
    assert "| 8B | checkpointing per pass (up to" in table


def test_determinism_spread_is_over_fresh_runs_and_identity_over_all():
    run = {"resumed_from_step": 0, "rougeL": 0.2, "adapter_sha256": "a", "predictions_sha256": "p"}
    runs = [run, {**run, "rougeL": 0.215}, {**run, "rougeL": 0.19, "resumed_from_step": 50}]
    assert bench_determinism.spread(runs) == {
        "runs": 2, "rougeL_points": [20.0, 21.5], "rougeL_max_minus_min": 1.5, "rougeL_sd": round(1.5 / 2**0.5, 3),
        "identical_adapters": True, "identical_predictions": True}
    assert not bench_determinism.spread([run, {**run, "adapter_sha256": "b"}])["identical_adapters"]


def test_determinism_jobs_take_the_switch_and_one_epoch_of_the_data(tmp_path: Path):
    job = stage_runs.job_params(tmp_path / "m", True, tiny=False, offline=True)
    t = job["training"]
    assert (t["deterministic"], t["max_steps"], t["save_steps"], t["learning_rate"]) == (True, -1, 50, 0.002)
    assert job["model"]["base_model"] == str(tmp_path / "m")
    assert "down_proj" in job["lora"]["target_modules"]  # the offline profile's adapters
    default = stage_runs.job_params(tmp_path / "m", False, tiny=False, offline=False)
    assert default["lora"]["target_modules"] == ["q_proj", "v_proj"] and not default["training"]["deterministic"]


def test_small_data_variants_reach_some_hundred_steps():
    variants = bench_small_data.variants(96, 8)  # 12 steps per epoch: 9 epochs reach 108
    assert list(variants) == ["fixed-warmup", "ratio", "epochs-9-fixed-warmup", "epochs-9"]
    assert variants["epochs-9"] == {"num_train_epochs": 9.0, "warmup_steps": None}
    assert variants["fixed-warmup"] == {"num_train_epochs": 1.0, "warmup_steps": 50}


def test_bench_host_link_needs_a_gpu_and_whole_sizes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device here; it measures a GPU's link to host memory"):
        bench_host_link.main(["--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        bench_host_link.main(["--sizes-mib", "16,1.5", "--out", str(tmp_path)])
    assert "--sizes-mib '16,1.5': whole numbers of MiB" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing measured, nothing written
