"""Evaluation's generation at scale: data-parallel over processes, resumable after a kill, with throughput.

Run alone, or under ``torchrun --nproc_per_node=N`` / ``accelerate launch``: accelerate's ``PartialState`` sets up
the process group (gloo on CPU, NCCL on GPUs) and ``split_between_processes`` hands each process its share of the
not-yet-done batches of the fixed plan (:mod:`review_lm.inference.resumable`); each process loads the model on its
own device, generates its batches and appends them to its partial file; after a barrier the main process reads every
batch back in test order. The decoding itself is :mod:`review_lm.inference.generation`'s (same settings, stop
tokens, prompt ids and cut at the first stop token). torch / transformers / accelerate are imported inside. """

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

from review_lm.data.text_tokens import encode_prompts
from review_lm.inference import resumable
from review_lm.inference.generation import (
    Generated,
    GenerationSettings,
    generation_config_kwargs,
    split_at_eos,
    stop_token_ids,
)
from review_lm.inference.model_loading import load_model_and_tokenizer

# Settings that decide the predictions (the partial files' fingerprint); device is not one of them on purpose:
# a run killed on one GPU may resume on another.
FINGERPRINT_FIELDS = ("max_new_tokens", "batch_size", "do_sample", "temperature", "top_p", "top_k", "seed", "dtype",
                      "base_model", "chat_template", "num_samples")


def launched_processes(environ: Mapping[str, str]) -> int:
    """How many processes torchrun / accelerate launch started (1 when run alone)."""
    try:
        return max(1, int(environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def fingerprint_settings(settings: GenerationSettings, backend: str = "hf") -> dict[str, Any]:
    values = asdict(settings)
    return {**{k: values[k] for k in FINGERPRINT_FIELDS}, "backend": backend}


def cpu_processes(device: str, accelerator_available: bool) -> bool:
    """Whether launched processes run on CPU (gloo): asked for, or no GPU. accelerate only forms a CPU process
    group when told (``PartialState(cpu=True)``); otherwise each process would generate everything alone."""
    return device == "cpu" or not accelerator_available


def process_state(device: str = "auto"):
    """accelerate's PartialState (initialises the process group once under a launcher)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=cpu_processes(device, torch.cuda.is_available()))


def rows_to_generated(n: int, done: dict[int, list[dict[str, Any]]], info: dict[str, Any]) -> Generated:
    """Every prompt's output in test order from the batches' rows; raises if one is missing."""
    texts: list[str | None] = [None] * n
    counts, hits = [0] * n, [False] * n
    samples: list[list[str]] = [[] for _ in range(n)]
    for rows in done.values():
        for row in rows:
            i = row["index"]
            texts[i], counts[i], hits[i] = row["text"], row["tokens"], row["hit"]
            samples[i] = row.get("samples") or [row["text"]]
    missing = [i for i, t in enumerate(texts) if t is None]
    if missing:
        raise RuntimeError(f"{len(missing)} predictions missing after generation (first: index {missing[0]})")
    several = any(len(s) > 1 for s in samples)
    return Generated([t or "" for t in texts], counts, hits, info, samples if several else None)


def batch_rows(batch: Sequence[int], new_tokens: Sequence[Sequence[int]], samples: int, eos_id, decode) -> list[dict]:
    """One row per prompt of the batch; ``new_tokens`` holds ``samples`` consecutive continuations per prompt
    (generate's num_return_sequences order). The first is the prediction; with several, all are kept."""
    rows = []
    for k, i in enumerate(batch):
        texts, count, hit = [], 0, False
        for j, ids in enumerate(new_tokens[k * samples:(k + 1) * samples]):
            kept, cut = split_at_eos(ids, eos_id)
            texts.append(decode(kept))
            if j == 0:
                count, hit = len(kept), cut
        row = {"index": i, "text": texts[0], "tokens": count, "hit": hit}
        if samples > 1:
            row["samples"] = texts
        rows.append(row)
    return rows


def generate_resumable(model_dir: str, prompts: Sequence[str], settings: GenerationSettings, out_dir: str,
                       header: dict[str, Any], progress: bool = True, state=None) -> Generated | None:
    """One continuation per prompt; the main process returns them in prompt order, the others None.

    ``header``: :func:`review_lm.inference.resumable.fingerprint` (checked against existing partial files by the caller,
    :func:`review_lm.inference.resumable.read_done`, before anything is written).
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import GenerationConfig, set_seed

    state = state or process_state(settings.device)
    device = settings.device
    if state.num_processes > 1 and device == "auto":  # one device per process: cuda:<local rank>, or cpu
        device = "cpu" if state.device.type == "cpu" else str(state.device)
    loaded = load_model_and_tokenizer(model_dir, device, settings.dtype, settings.trust_remote_code,
                                      settings.base_model)
    if state.is_main_process:
        print(loaded.summary, file=sys.stderr)
    model, tokenizer = loaded.model, loaded.tokenizer
    eos_id, pad_id = stop_token_ids(tokenizer, settings.chat_template), tokenizer.pad_token_id
    gen_kwargs = generation_config_kwargs(settings, eos_id, pad_id)
    if settings.num_samples > 1:
        gen_kwargs["num_return_sequences"] = settings.num_samples
    gen_config = GenerationConfig(**gen_kwargs)

    # Prompts are the exact training prefix: no BOS/special tokens added (the data loader's contract), and data
    # text stays text (review_lm.data.text_tokens.encode_prompts).
    prompt_ids = encode_prompts(tokenizer, prompts, settings.chat_template)
    lengths = [len(ids) for ids in prompt_ids]
    plan = resumable.plan_batches(lengths, settings.batch_size)
    done = resumable.read_done(out_dir, header)
    already = sum(len(rows) for b, rows in done.items() if b < len(plan))
    state.wait_for_everyone()  # every process has read the partial files before any appends to one
    if done and state.is_main_process:
        print(f"resuming generation: {already} of {len(prompts)} predictions already written "
              f"({len(done)} of {len(plan)} batches in {out_dir})")
    todo = resumable.interleave([b for b in range(len(plan)) if b not in done], state.num_processes)
    writer = None
    started = time.time()
    generated_here = 0
    with state.split_between_processes(todo) as mine:
        if mine:
            os.makedirs(out_dir, exist_ok=True)
            writer = resumable.PartialWriter(resumable.partial_path(out_dir, state.process_index), header)
        bar = tqdm(total=len(prompts), initial=already, desc="generating", unit="sample",
                   disable=not (progress and state.is_main_process), smoothing=0.1)
        for b in mine:
            batch = plan[b]
            if settings.do_sample:
                set_seed(resumable.batch_seed(settings.seed, b))
            enc = tokenizer.pad({"input_ids": [prompt_ids[i] for i in batch]}, padding=True,
                                return_tensors="pt").to(loaded.device)
            with torch.inference_mode():
                out = model.generate(**enc, generation_config=gen_config)
            rows = batch_rows(batch, out[:, enc["input_ids"].shape[1]:].tolist(), settings.num_samples, eos_id,
                              lambda ids: tokenizer.decode(ids, skip_special_tokens=True).strip())
            writer.write_batch(b, rows)
            generated_here += len(batch)
            # The bar counts this process's samples scaled by the number of processes: what all of them make.
            bar.update(len(batch) * (state.num_processes if state.num_processes > 1 else 1))
        bar.close()
    if writer is not None:
        writer.close()
    elapsed = time.time() - started
    state.wait_for_everyone()  # every batch is on disk
    processes = state.num_processes
    if processes > 1:  # nothing more to share: scoring is the main process's alone
        state.destroy_process_group()
    if not state.is_main_process:
        return None
    total_elapsed = time.time() - started
    done = resumable.read_done(out_dir, header)
    new = len(prompts) - already
    info = {
        "device": loaded.device, "dtype": loaded.dtype, "batch_size": settings.batch_size, "seed": settings.seed,
        "generation_config": gen_kwargs,
        "model_generation_config": model.generation_config.to_diff_dict(),
        "note": "generation_config is passed to model.generate; model_generation_config "
                "(the model's generation_config.json) only fills fields not set there",
        "prompt_tokens": {"min": min(lengths), "max": max(lengths), "mean": sum(lengths) / len(lengths)},
        "sampling_seed": "seed + batch number, set before each batch (the same samples whatever the number of "
                         "processes or resumes)" if settings.do_sample else None,
        "backend": "hf",
        "processes": processes,
        "resumed_predictions": already,
        "generated_predictions": new,
        "generation_time_s": round(total_elapsed, 2),
        "samples_per_s": round(new / total_elapsed, 3) if total_elapsed > 0 and new else None,
        "main_process_time_s": round(elapsed, 2),
        "main_process_samples": generated_here,
    }
    return rows_to_generated(len(prompts), done, info)
