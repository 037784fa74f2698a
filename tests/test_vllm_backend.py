"""Tests for --backend vllm (review_lm.inference.vllm_backend): every decision without vLLM installed, the one-line
refusal when it is absent, and (gpu-marked, with vllm installed) greedy vLLM against HF and a LoRA run served unmerged.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from review_lm.inference import vllm_backend as vb
from review_lm.inference.generation import GenerationSettings
from review_lm.utils import UsageError

REPO = Path(__file__).resolve().parent.parent
SCRIPT = str(REPO / "evaluate_movie_review.py")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import clean_env, one_line_error  # noqa: E402


@pytest.mark.parametrize("backend,installed,processes,tp,generating,expected", [
    ("hf", False, 1, 1, True, None),
    ("hf", False, 4, 1, True, None),  # torchrun shards the hf backend
    ("hf", True, 1, 2, True, "--tensor_parallel_size is for --backend vllm"),
    ("vllm", False, 1, 1, True, "--backend vllm needs the vllm package, which is not installed"),
    ("vllm", False, 1, 1, False, None),  # --predictions / --baselines_only: nothing to generate
    ("vllm", True, 2, 1, True, "drop torchrun / accelerate launch and use --tensor_parallel_size N"),
    ("vllm", True, 1, 4, True, None),
])
def test_refusals(backend, installed, processes, tp, generating, expected):
    reason = vb.refusal(backend, installed, processes, tp, generating)
    assert (reason is None) if expected is None else (expected in reason and "\n" not in reason)


def test_full_model_loads_from_its_folder():
    assert vb.plan_model("/runs/full", None, None) == vb.ModelPlan("/runs/full", "/runs/full", None, None)


@pytest.mark.parametrize("rank,limit", [(1, 8), (8, 8), (12, 16), (64, 64), (300, 320)])
def test_lora_run_is_base_plus_adapter_with_its_rank(rank, limit):
    config = {"base_model_name_or_path": "Qwen/Qwen2.5-0.5B", "r": rank}
    assert vb.plan_model("/runs/lora", config, None) == vb.ModelPlan("Qwen/Qwen2.5-0.5B", "/runs/lora", "/runs/lora",
                                                                      limit)
    assert vb.plan_model("/runs/lora", config, "/models/base").model == "/models/base"  # --base_model wins


@pytest.mark.parametrize("config,message", [
    ({"r": 8}, "names no base model; pass --base_model"),
    ({"base_model_name_or_path": "b"}, "no LoRA rank 'r'"),
    ({"base_model_name_or_path": "b", "r": 1024}, "merge the adapter"),
])
def test_unservable_adapters_are_refused_in_one_line(config, message):
    with pytest.raises(UsageError, match=message):
        vb.plan_model("/runs/lora", config, None)


def test_engine_turns_prefix_caching_on_and_lora_only_for_adapters():
    settings = GenerationSettings(dtype="bf16", seed=7)
    full = vb.engine_kwargs(vb.ModelPlan("/m", "/m", None, None), settings, 2)
    assert full == {"model": "/m", "tokenizer": "/m", "dtype": "bfloat16", "tensor_parallel_size": 2, "seed": 7,
                    "enable_prefix_caching": True, "trust_remote_code": False}
    lora = vb.engine_kwargs(vb.ModelPlan("base", "/a", "/a", 16), GenerationSettings(), 1)
    assert (lora["model"], lora["tokenizer"], lora["dtype"]) == ("base", "/a", "auto")
    assert (lora["enable_lora"], lora["max_lora_rank"], lora["max_loras"]) == (True, 16, 1)


def test_sampling_params_mirror_the_hf_settings():
    greedy = vb.sampling_kwargs(GenerationSettings(max_new_tokens=64), [2, 151645], seed=None)
    assert greedy == {"n": 1, "max_tokens": 64, "stop_token_ids": [2, 151645], "repetition_penalty": 1.0,
                      "skip_special_tokens": True, "detokenize": False, "temperature": 0.0, "top_p": 1.0, "top_k": -1}
    sampled = vb.sampling_kwargs(GenerationSettings(do_sample=True, temperature=0.9, top_p=0.8, top_k=0), [2], 11, 5)
    assert {k: sampled[k] for k in ("n", "temperature", "top_p", "top_k", "seed")} == {
        "n": 5, "temperature": 0.9, "top_p": 0.8, "top_k": -1, "seed": 11}
    assert vb.sampling_kwargs(GenerationSettings(do_sample=True, top_k=40), [2], 1)["top_k"] == 40


def test_prompts_go_in_as_token_ids():
    assert vb.prompt_inputs([[1, 2], (3,)]) == [{"prompt_token_ids": [1, 2]}, {"prompt_token_ids": [3]}]


def test_adapter_config_is_read_from_the_run(tmp_path):
    assert vb.read_adapter_config(str(tmp_path)) is None
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8, "base_model_name_or_path": "b"}))
    assert vb.read_adapter_config(str(tmp_path))["r"] == 8


@pytest.mark.slow
@pytest.mark.skipif(vb.vllm_installed(), reason="vllm is installed here")
def test_backend_vllm_without_vllm_is_one_line_and_writes_nothing(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    proc = subprocess.run([sys.executable, SCRIPT, "--model_dir", str(run), "--backend", "vllm"], capture_output=True,
                          text=True, timeout=120, env=clean_env(), cwd=str(REPO))
    assert one_line_error(proc).startswith("error: --backend vllm needs the vllm package")
    assert list(run.iterdir()) == []


# --------------------------------------------------------------------------------------------------------------
# On a GPU with vllm installed
# --------------------------------------------------------------------------------------------------------------
def _vllm_or_skip():
    if not vb.vllm_installed():
        pytest.skip("vllm is not installed")


@pytest.mark.gpu
@pytest.mark.slow
def test_greedy_vllm_matches_hf_on_a_tiny_model(tmp_path, example_data_file):
    """Identical for >= 95% of prompts: vLLM's kernels (paged attention, other matmul order) differ from HF's in
    the last bits, so where two tokens' logits are nearly tied greedy decoding may pick the other one."""
    _vllm_or_skip()
    run = _tiny_run(tmp_path, example_data_file)
    rows = {}
    for backend in ("hf", "vllm"):
        out = tmp_path / backend
        proc = subprocess.run([sys.executable, SCRIPT, "--model_dir", str(run), "--output_dir", str(out),
                               "--backend", backend, "--max_new_tokens", "16", "--dtype", "fp32", "--no_progress"],
                              capture_output=True, text=True, timeout=900, env=clean_env(), cwd=str(REPO))
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows[backend] = [json.loads(line)["prediction"] for line in (out / "predictions.jsonl").open()]
    same = sum(a == b for a, b in zip(rows["hf"], rows["vllm"], strict=True))
    assert same >= 0.95 * len(rows["hf"]), (same, len(rows["hf"]))


@pytest.mark.gpu
@pytest.mark.slow
def test_lora_run_is_served_without_merging(tmp_path, example_data_file):
    _vllm_or_skip()
    from helpers import run_train

    out = tmp_path / "lora_run"
    base = _tiny_base(tmp_path, example_data_file)
    proc = run_train("--data_file", str(example_data_file), "--model_path", str(base), "--output_dir", str(out),
                     "--finetuning_type", "lora", "--max_epochs", "1", "--max_length", "256", "--report_to", "none",
                     timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "adapter_config.json").is_file() and not (out / "merged").exists()
    ev = subprocess.run([sys.executable, SCRIPT, "--model_dir", str(out), "--backend", "vllm", "--max_new_tokens",
                         "8", "--no_progress"], capture_output=True, text=True, timeout=900, env=clean_env(),
                        cwd=str(REPO))
    assert ev.returncode == 0, ev.stderr[-3000:]
    metrics = json.loads((out / "eval" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["generation"]["backend"] == "vllm" and metrics["generation"]["engine"]["enable_lora"] is True
    assert not (out / "merged").exists()


def _tiny_base(tmp_path: Path, example: Path) -> Path:
    from review_lm.testing.tiny_model import make_tiny_model

    base = tmp_path / "base"
    make_tiny_model(str(base), tokenizer_kind="bpe", corpus=[str(example)], vocab_size=1000, hidden_size=64,
                    num_layers=2)
    return base


def _tiny_run(tmp_path: Path, example: Path) -> Path:
    from transformers import AutoTokenizer

    import data_loader_movie_review as dl
    from review_lm.data import datasets as rd
    from review_lm.runs import run_folder as rf
    from review_lm.runs import test_set

    run = _tiny_base(tmp_path, example)
    tokenizer = AutoTokenizer.from_pretrained(str(run))
    splits = dl.split_chronologically(dl.load_review_file(str(example)))
    test = rd.build_datasets({"test": splits["test"]}, tokenizer, 512, dl.PromptBuilder())["test"]
    test_set.write_test_samples(str(run / rf.TEST_SAMPLES), test.encoded_samples())
    test_set.write_test_histories(str(run / rf.TEST_HISTORIES), splits["test"])
    return run
