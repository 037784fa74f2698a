"""``--backend vllm``: evaluation's generation on vLLM's offline engine (paged attention, prefix caching, LoRA
without merging), producing the same rows as the HF backend (:mod:`review_lm.inference.parallel_generation`).

Every decision is a pure function tested without vLLM installed: whether the backend can run at all
(:func:`refusal`), what to load (:func:`plan_model`: a full fine-tune from its folder; a LoRA run as its base
model plus a ``LoRARequest`` for the adapter, ``max_lora_rank`` from adapter_config.json), the engine's settings
(:func:`engine_kwargs`: ``enable_prefix_caching`` on, since a user's test prompts share their whole history;
``tensor_parallel_size``), the decoding settings as ``SamplingParams`` (:func:`sampling_kwargs`) and the inputs
(:func:`prompt_inputs`: the training prompt's token ids, never re-tokenised text). Outputs are cut at the first
stop token and decoded with the run's own tokenizer, exactly like the HF backend. vllm is imported only inside
:func:`generate_vllm`; it is optional (``pip install vllm`` on a CUDA machine).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from review_lm.data.text_tokens import encode_prompts
from review_lm.inference import resumable
from review_lm.inference.generation import Generated, GenerationSettings
from review_lm.runs.run_folder import ADAPTER_CONFIG
from review_lm.utils import UsageError

BACKENDS = ("hf", "vllm")
# vLLM accepts only these LoRA ranks for max_lora_rank (vllm.config.LoRAConfig); an adapter's r is rounded up.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DTYPES = {"auto": "auto", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
PROMPTS_PER_CALL = 4096  # plan batches are sent to the engine this many prompts at a time (and then saved)


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def refusal(backend: str, installed: bool, processes: int, tensor_parallel_size: int,
            generating: bool) -> str | None:
    """Why these settings cannot run (one line), or None."""
    if backend == "hf":
        if tensor_parallel_size != 1:
            return "--tensor_parallel_size is for --backend vllm; the hf backend shards by processes (torchrun)"
        return None
    if not generating:
        return None  # --predictions / --baselines_only generate nothing: the backend is irrelevant
    if not installed:
        return ("--backend vllm needs the vllm package, which is not installed (pip install vllm, on a CUDA "
                "machine); or use --backend hf")
    if processes > 1:
        return ("--backend vllm runs in one process and spreads the model itself: drop torchrun / accelerate "
                "launch and use --tensor_parallel_size N")
    return None


@dataclass(frozen=True)
class ModelPlan:
    model: str  # what vLLM loads: the run folder, or a LoRA run's base model
    tokenizer: str  # always the run folder: training saved its tokenizer (pad token, chat template) there
    lora_path: str | None  # the adapter folder, served by a LoRARequest without merging
    max_lora_rank: int | None


def lora_rank_limit(rank: int) -> int:
    """The smallest rank vLLM accepts that holds ``rank``."""
    for allowed in VLLM_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise UsageError(f"LoRA rank {rank} is above the largest vLLM serves ({VLLM_LORA_RANKS[-1]}); merge the "
                     "adapter (train_distributed_MovieReview.py --merge_lora) and evaluate the merged folder")


def plan_model(model_dir: str, adapter_config: Mapping[str, Any] | None, base_model: str | None) -> ModelPlan:
    """A full fine-tune is loaded from its folder; a LoRA run as base model + adapter (``--base_model`` overrides
    the base recorded in adapter_config.json)."""
    if adapter_config is None:
        return ModelPlan(model_dir, model_dir, None, None)
    base = base_model or adapter_config.get("base_model_name_or_path")
    if not base:
        raise UsageError(f"{os.path.join(model_dir, ADAPTER_CONFIG)}: names no base model; pass --base_model")
    rank = adapter_config.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise UsageError(f"{os.path.join(model_dir, ADAPTER_CONFIG)}: no LoRA rank 'r' in it")
    return ModelPlan(base, model_dir, model_dir, lora_rank_limit(rank))


def read_adapter_config(model_dir: str) -> dict[str, Any] | None:
    path = os.path.join(model_dir, ADAPTER_CONFIG)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def engine_kwargs(plan: ModelPlan, settings: GenerationSettings, tensor_parallel_size: int) -> dict[str, Any]:
    """Arguments of ``vllm.LLM``."""
    kwargs: dict[str, Any] = {
        "model": plan.model, "tokenizer": plan.tokenizer, "dtype": VLLM_DTYPES[settings.dtype],
        "tensor_parallel_size": tensor_parallel_size, "seed": settings.seed,
        "enable_prefix_caching": True,  # a user's test prompts share the whole history: computed once
        "trust_remote_code": settings.trust_remote_code,
    }
    if plan.lora_path is not None:
        kwargs.update(enable_lora=True, max_lora_rank=plan.max_lora_rank, max_loras=1)
    return kwargs


def sampling_kwargs(settings: GenerationSettings, stop_ids: Sequence[int], seed: int | None,
                    samples: int = 1) -> dict[str, Any]:
    """Arguments of ``vllm.SamplingParams`` with the HF backend's decoding: greedy is temperature 0; sampling
    keeps temperature / top_p / top_k (0 = off in both); no repetition penalty; up to max_new_tokens; stop at
    EOS and the chat format's end-of-turn (``stop_token_ids``)."""
    kwargs: dict[str, Any] = {
        "n": samples, "max_tokens": settings.max_new_tokens, "stop_token_ids": list(stop_ids),
        "repetition_penalty": 1.0, "skip_special_tokens": True, "detokenize": False,  # decoded like HF, below
    }
    if settings.do_sample:
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p,
                      top_k=settings.top_k if settings.top_k > 0 else -1, seed=seed)
    else:
        kwargs.update(temperature=0.0, top_p=1.0, top_k=-1)
    return kwargs


def prompt_inputs(token_ids: Sequence[Sequence[int]]) -> list[dict[str, list[int]]]:
    """vLLM ``TokensPrompt`` dicts: the ids training saw, so nothing is re-tokenised differently."""
    return [{"prompt_token_ids": list(ids)} for ids in token_ids]


def generate_vllm(model_dir: str, prompts: Sequence[str], settings: GenerationSettings, out_dir: str,
                  header: dict[str, Any], tensor_parallel_size: int = 1) -> Generated:
    """Every prompt's continuation with vLLM, batches of the same plan saved to the same partial file as the
    HF backend (a killed run resumes)."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from review_lm.inference.generation import stop_token_ids
    from review_lm.inference.parallel_generation import batch_rows

    plan = plan_model(model_dir, read_adapter_config(model_dir), settings.base_model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=settings.trust_remote_code)
    stop = stop_token_ids(tokenizer, settings.chat_template)
    ids = encode_prompts(tokenizer, prompts, settings.chat_template)  # data text stays text, as in training
    batches = resumable.plan_batches([len(x) for x in ids], settings.batch_size)
    done = resumable.read_done(out_dir, header)
    already = sum(len(rows) for rows in done.values())
    if done:
        print(f"resuming generation: {already} of {len(prompts)} predictions already written "
              f"({len(done)} of {len(batches)} batches in {out_dir})")
    engine = LLM(**engine_kwargs(plan, settings, tensor_parallel_size))
    lora = LoRARequest("adapter", 1, plan.lora_path) if plan.lora_path else None
    os.makedirs(out_dir, exist_ok=True)
    writer = resumable.PartialWriter(resumable.partial_path(out_dir, 0), header)
    todo = [b for b in range(len(batches)) if b not in done]
    started = time.time()
    group: list[int] = []
    for position, b in enumerate(todo):
        group.append(b)
        if sum(len(batches[g]) for g in group) < PROMPTS_PER_CALL and position + 1 < len(todo):
            continue
        indices = [i for g in group for i in batches[g]]
        params = [SamplingParams(**sampling_kwargs(settings, stop, resumable.batch_seed(settings.seed, i),
                                                   settings.num_samples)) for i in indices]
        outputs = engine.generate(prompt_inputs([ids[i] for i in indices]), params, lora_request=lora,
                                  use_tqdm=True)
        by_index = {}
        for i, result in zip(indices, outputs, strict=True):
            by_index[i] = batch_rows([i], [o.token_ids for o in result.outputs], settings.num_samples, stop,
                                     lambda ids: tokenizer.decode(ids, skip_special_tokens=True).strip())[0]
        for g in group:
            writer.write_batch(g, [by_index[i] for i in batches[g]])
        group = []
    writer.close()
    elapsed = time.time() - started
    print(f"vLLM: {len(prompts) - already} predictions in {elapsed:.1f} s", file=sys.stderr)
    from review_lm.inference.parallel_generation import rows_to_generated

    new = len(prompts) - already
    info = {"device": "cuda", "dtype": settings.dtype, "batch_size": settings.batch_size, "seed": settings.seed,
            "generation_config": sampling_kwargs(settings, stop, settings.seed),
            "engine": {k: v for k, v in engine_kwargs(plan, settings, tensor_parallel_size).items()},
            "prompt_tokens": {"min": min(map(len, ids)), "max": max(map(len, ids)),
                              "mean": sum(map(len, ids)) / len(ids)},
            "backend": "vllm", "processes": 1, "tensor_parallel_size": tensor_parallel_size,
            "resumed_predictions": already, "generated_predictions": new,
            "generation_time_s": round(elapsed, 2), "samples_per_s": round(new / elapsed, 3) if new else None}
    return rows_to_generated(len(prompts), resumable.read_done(out_dir, header), info)
