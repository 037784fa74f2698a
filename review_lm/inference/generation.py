"""Generation shared by evaluation and ``generate_review.py``: decoding settings, batched and single prompts.

Every field that decides the output is set explicitly (:func:`generation_config_kwargs`); prompts are fed as
the exact training prefix (no special tokens added), and each output is cut at the first stop token: EOS, and
for chat-formatted runs (``--prompt_format conversation`` or ``--chat_template``) also the end-of-turn token
(:func:`stop_token_ids`, from the run's recorded ``chat_template``).
torch / transformers are imported inside the functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from review_lm.inference.model_loading import LoadedModel
from review_lm.utils import DTYPE_CHOICES, UsageError, check_range


@dataclass
class GenerationSettings:
    max_new_tokens: int = 128
    batch_size: int = 8
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 0
    seed: int = 42
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False
    base_model: str | None = None  # overrides a LoRA adapter's recorded base model
    chat_template: str = "none"  # the run's recorded template (run_folder.RunRecord): decides the stop tokens
    num_samples: int = 1  # continuations per prompt (evaluation's --num_samples, with do_sample)


def add_loading_arguments(parser) -> None:
    """The flags that say how a trained run folder loads for generation (evaluation and generate_review)."""
    parser.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                        help="weights dtype; auto = bf16 on a GPU that supports it, else fp32")
    parser.add_argument("--trust_remote_code", action="store_true", help="allow custom model code from MODEL_DIR")
    parser.add_argument("--base_model",
                        help="base model of a LoRA adapter run, if not where adapter_config.json says")


def add_decoding_arguments(parser, *, sample_by_default: bool, max_new_tokens: int) -> None:
    """The decoding flags of evaluation and generate_review, defined once. Only the defaults differ, on purpose:
    evaluation decodes greedily unless ``--do_sample`` (scores that repeat run to run and compare across runs),
    generation samples unless ``--greedy`` (varied reviews, as a person writes them) and writes longer reviews."""
    parser.add_argument("--max_new_tokens", type=int, default=max_new_tokens,
                        help=f"most tokens generated per review (default {max_new_tokens})")
    if sample_by_default:
        parser.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling (deterministic)")
    else:
        parser.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (0.7)")
    parser.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling mass (0.9)")
    parser.add_argument("--top_k", type=int, default=0, help="top-k filter when sampling; 0 = off (default)")


def check_decoding(max_new_tokens: int, temperature: float, top_p: float, top_k: int = 0) -> None:
    """The decoding flags' ranges, one line (UsageError) for the first one out of range."""
    check_range("max_new_tokens", max_new_tokens, 1)
    check_range("temperature", temperature, 0, inclusive=False)
    check_range("top_p", top_p, 0, inclusive=False, maximum=1)
    check_range("top_k", top_k, 0)


@dataclass
class Generated:
    texts: list[str]
    token_counts: list[int]  # new tokens before EOS (EOS itself not counted)
    hit_limit: list[bool]  # no EOS within max_new_tokens: the output was cut off
    info: dict[str, Any]  # resolved device / dtype / generation config, for metrics.json
    samples: list[list[str]] | None = None  # with num_samples K > 1: per prompt all K texts (texts = the first)


def stop_token_ids(tokenizer, chat_template: str = "none") -> list[int]:
    """What ends a review: the chat format's end-of-turn and EOS (``chat_layout.ChatFormat.stop_token_ids``), or
    EOS alone for the plain spec prompt."""
    from review_lm.data.chat_layout import ChatFormatError
    from review_lm.data.datasets import chat_format_for

    try:
        fmt = chat_format_for(tokenizer, chat_template)
    except ChatFormatError as err:  # e.g. the model folder's tokenizer lost the template training used
        raise UsageError(f"the model's tokenizer: {err}") from None
    return list(fmt.stop_token_ids) if fmt is not None else [tokenizer.eos_token_id]


def generation_config_kwargs(settings: GenerationSettings, eos_id: int | list[int], pad_id: int) -> dict[str, Any]:
    """Everything that decides the output is set explicitly: a field left unset would be filled from the
    model's own generation_config.json (a chat model's may turn sampling or a repetition penalty on)."""
    kwargs: dict[str, Any] = {
        "max_new_tokens": settings.max_new_tokens, "do_sample": settings.do_sample, "num_beams": 1,
        "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "eos_token_id": eos_id, "pad_token_id": pad_id,
        "use_cache": True,
    }
    if settings.do_sample:
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k)
    return kwargs


def split_at_eos(ids: Sequence[int], eos_id: int | Sequence[int]) -> tuple[list[int], bool]:
    """New token ids up to (not including) the first stop token (EOS or any of a list), and whether none was
    reached."""
    ids, stops = list(ids), {eos_id} if isinstance(eos_id, int) else set(eos_id)
    cut = next((i for i, t in enumerate(ids) if t in stops), None)
    return (ids, True) if cut is None else (ids[:cut], False)


@dataclass
class Written:
    text: str
    new_tokens: int  # before EOS
    hit_limit: bool  # stopped at max_new_tokens without EOS
    seed: int | None


def generate_one(loaded: LoadedModel, prompt_ids: list[int], gen_config, seed: int | None,
                 stream: bool) -> Written:
    """One continuation of ``prompt_ids`` (passed as given: the dataset's pieces, exactly as training saw
    them), streamed to stdout when ``stream``; ``seed`` (if any) is set right before, so it alone decides it."""
    import torch
    from transformers import TextStreamer, set_seed

    model, tokenizer = loaded.model, loaded.tokenizer
    if seed is not None:
        set_seed(seed)
    input_ids = torch.tensor([prompt_ids], device=loaded.device)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             generation_config=gen_config, streamer=streamer)
    kept, cut = split_at_eos(out[0, len(prompt_ids):].tolist(), gen_config.eos_token_id)
    return Written(tokenizer.decode(kept, skip_special_tokens=True).strip(), len(kept), cut, seed)
