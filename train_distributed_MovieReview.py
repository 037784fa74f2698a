"""Fine-tune a causal LM to write Douban movie reviews in one user's style, from their dated review history.

One script for one device and for many::

    python train_distributed_MovieReview.py --data_file example_movie_review_data.json --output_dir outputs/Y
    torchrun --nproc_per_node=4 train_distributed_MovieReview.py --data_file ... --output_dir ...

Prompts and labels come from ``data_loader_movie_review`` (the only prompt builder). Training is transformers'
``Trainer``: DDP under torchrun (NCCL on GPUs, gloo on CPU), each micro-batch packed into one row without
padding, loss and LM head on the review + EOS positions only (``completion_training``), evaluation and a checkpoint every epoch, early stopping on validation loss, the best
checkpoint reloaded and saved at the end. FlashAttention 2 is used where it can run, PyTorch SDPA otherwise.

Outputs (output_dir): pytorch_model.bin (or model.safetensors), config.json, tokenizer files,
training_config.json, test_samples.json, training_samples_preview.txt, loss_curve.png, checkpoint-*/.
LoRA / QLoRA runs (``adapters``) write an adapter instead of the weights, plus merged/ with --merge_lora;
FSDP / DeepSpeed ZeRO sharding (``sharding``) gathers whole weights for the final save.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import netrc
import os
import re
import shutil
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import adapters
import data_loader_movie_review as dl
import fault_tolerance as ft
import sharding
from precision import PRECISIONS, PrecisionPlan, optimi_importable, plan_precision
from run_utils import (
    UsageError,
    importable,
    library_versions,
    pyplot,
    write_atomic,
    write_json_atomic,
    write_text_atomic,
)

if TYPE_CHECKING:  # review_dataset imports torch: loaded only once the data has been validated
    import review_dataset as rd

logger = logging.getLogger("movie_review")

PREVIEW_SAMPLES = 3
PROMPT_CHECK_SAMPLES = 32  # training prompts re-tokenized as text to check they match the assembled ids
FINISHED_MARKER = "training_config.json"  # written last: its presence means the run finished
# Everything a run writes into output_dir; --overwrite_output_dir removes exactly these (never other files).
RUN_ARTIFACTS = (
    "pytorch_model.bin", "model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt",
    "added_tokens.json", FINISHED_MARKER, "test_samples.json", "training_samples_preview.txt", "loss_curve.png",
    "training_args.bin", "eval", ft.WANDB_ID_FILE,
) + adapters.ADAPTER_ARTIFACTS
_CHECKPOINT_RE = re.compile(r"^checkpoint-\d+$")


# --------------------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Train a Douban movie-review style model (single device or torchrun DDP).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = p.add_argument_group("data")
    data.add_argument("--data_file", required=True, nargs="+", metavar="PATH",
                      help="review JSON file (spec format); several files and/or directories of .json files "
                           "load as one data set")
    data.add_argument("--train_ratio", type=float, default=0.7, help="oldest share of each user's reviews: train")
    data.add_argument("--val_ratio", type=float, default=0.15, help="next share: validation (early stopping)")
    data.add_argument("--test_ratio", type=float, default=0.15, help="newest share: test (test_samples.json)")

    model = p.add_argument_group("model")
    model.add_argument("--model_path", default="Qwen/Qwen2.5-3B", help="hub id or local folder of the base model")
    model.add_argument("--output_dir", required=True, help="where the model and run files are written")
    model.add_argument("--max_length", type=int, default=4096, help="max tokens per sample (history is trimmed)")
    model.add_argument("--trust_remote_code", action="store_true", help="allow custom model code from the model repo")

    train = p.add_argument_group("training")
    train.add_argument("--batch_size", type=int, default=2, help="per-device batch size")
    train.add_argument("--gradient_accumulation_steps", type=int, default=8, help="micro-batches per optimizer step")
    train.add_argument("--learning_rate", type=float, default=1e-5, help="peak learning rate (AdamW, linear decay)")
    train.add_argument("--max_epochs", type=int, default=50, help="maximum number of epochs")
    train.add_argument("--warmup_steps", type=int, default=100, help="linear warmup optimizer steps")
    train.add_argument("--early_stopping_patience", type=int, default=3,
                       help="stop after this many evaluations without a lower validation loss (evaluations are "
                            "once per epoch, or every --eval_steps steps)")
    train.add_argument("--seed", type=int, default=42, help="random seed")
    train.add_argument("--gradient_checkpointing", action="store_true", help="trade compute for activation memory")
    train.add_argument("--logging_steps", type=int, default=0,
                       help="log the training loss every N optimizer steps (0: once per epoch)")
    train.add_argument("--save_steps", type=int, default=0,
                       help="write a checkpoint every N optimizer steps (0: once per epoch); with a validation "
                            "split it also evaluates every N steps unless --eval_steps is given")
    train.add_argument("--eval_steps", type=int, default=0,
                       help="evaluate (and checkpoint, unless --save_steps is given; --save_steps must then be a "
                            "multiple of it) every N optimizer steps (0: once per epoch); early stopping then "
                            "counts these evaluations")

    ablation = p.add_argument_group("ablation")
    ablation.add_argument("--use_profile", dest="use_profile", action="store_true", default=True,
                          help="put the user's profile (用户 line) in the prompt")
    ablation.add_argument("--no_profile", dest="use_profile", action="store_false", help="leave the profile out")
    ablation.add_argument("--use_history", dest="use_history", action="store_true", default=True,
                          help="put the user's earlier reviews in the prompt")
    ablation.add_argument("--no_history", dest="use_history", action="store_false", help="leave the history out")

    run = p.add_argument_group("run")
    run.add_argument("--disable_flash_attn", action="store_true", help="use PyTorch SDPA even if FlashAttention 2 works")
    run.add_argument("--precision", choices=PRECISIONS, default="auto",
                     help="auto: bf16-mixed on a bf16 GPU (fp32 master weights, bf16 compute), fp16-mixed on "
                          "older GPUs, fp32 on CPU. bf16-pure: bf16 weights + Kahan-compensated AdamW (less memory)")
    run.add_argument("--disable_packing", action="store_true",
                     help="pad each micro-batch to its longest sample instead of packing it into one row")
    run.add_argument("--disable_completion_only_logits", action="store_true",
                     help="compute the LM head at every position, not only where the next token is labelled")
    run.add_argument("--report_to", choices=["wandb", "none"], default=None,
                     help="experiment tracking (default: wandb if installed, offline when not logged in)")
    run.add_argument("--wandb_project", default="MovieReview", help="W&B project name")
    run.add_argument("--wandb_run_name", default=None, help="W&B run name (default: output_dir's name)")
    run.add_argument("--resume_from_checkpoint", nargs="?", const="latest", default=None,
                     help="continue from PATH, or from the latest checkpoint in output_dir when no PATH is given")
    run.add_argument("--overwrite_output_dir", action="store_true",
                     help="replace a previous run's files in output_dir")
    run.add_argument("--preview_only", action="store_true",
                     help="write training_samples_preview.txt and test_samples.json, then stop (no model load)")
    run.add_argument("--save_format", choices=["bin", "safetensors"], default="bin",
                     help="final weights as pytorch_model.bin (spec) or model.safetensors")
    adapters.add_arguments(p)
    sharding.add_arguments(p)
    args = p.parse_args(argv)
    for name in ("batch_size", "gradient_accumulation_steps", "max_epochs", "max_length"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.warmup_steps < 0 or args.early_stopping_patience < 1 or args.logging_steps < 0:
        p.error("--warmup_steps and --logging_steps must be >= 0, --early_stopping_patience >= 1")
    if args.save_steps < 0 or args.eval_steps < 0:
        p.error("--save_steps and --eval_steps must be >= 0 (0: once per epoch)")
    return args


# --------------------------------------------------------------------------------------------------------------
# Decisions (pure functions: unit-tested without a GPU)
# --------------------------------------------------------------------------------------------------------------
def choose_attention(disable_flash_attn: bool, flash_attn_importable: bool, cuda_available: bool,
                     compute_dtype: str, compute_capability: tuple[int, int] | None) -> tuple[str, str]:
    """Return (attn_implementation, reason). FlashAttention 2 only when every condition holds.

    ``compute_dtype`` is the dtype the maths runs in (``PrecisionPlan.compute_dtype``): under bf16/fp16 autocast
    the weights may be fp32 and FA2 still runs, because its inputs are half precision.
    We decide ourselves and never ask transformers for "flash_attention_2" when it cannot run: without the
    package it raises, and with the ``kernels`` package installed it may try to fetch a kernel from the hub.
    """
    if disable_flash_attn:
        return "sdpa", "--disable_flash_attn given"
    if not cuda_available:
        return "sdpa", "no CUDA GPU"
    if not flash_attn_importable:
        return "sdpa", "flash_attn is not installed (pip install flash-attn --no-build-isolation)"
    if compute_capability is not None and compute_capability < (8, 0):
        return "sdpa", f"GPU compute capability {compute_capability[0]}.{compute_capability[1]} < 8.0 (Ampere)"
    if compute_dtype not in ("bf16", "fp16"):
        return "sdpa", f"FlashAttention 2 needs fp16/bf16 compute, precision is {compute_dtype}"
    return "flash_attention_2", f"flash_attn available on a CUDA GPU, {compute_dtype} compute"


def flash_attn_importable() -> bool:
    """flash_attn installed and built for this torch/CUDA."""
    return importable("flash_attn")


@dataclass(frozen=True)
class RuntimePlan:
    """Everything decided about the hardware, in one place: what the model is loaded with and trained in."""

    precision: PrecisionPlan  # weights dtype, autocast, optimizer (precision.py)
    attention: str  # attn_implementation passed to from_pretrained
    attention_reason: str
    device: str  # cuda | cpu
    pad_to_multiple_of: int | None  # tensor-core friendly shapes on GPU

    @property
    def weights_dtype(self) -> str:
        return self.precision.weights_dtype

    def training_kwargs(self) -> dict[str, Any]:
        return {**self.precision.training_kwargs(), "use_cpu": self.device == "cpu",
                "dataloader_pin_memory": self.device == "cuda"}


def plan_runtime(disable_flash_attn: bool, cuda_available: bool, bf16_supported: bool,
                 compute_capability: tuple[int, int] | None, flash_attn_ok: bool, precision: str = "auto",
                 finetuning_type: str = "full", optimi_available: bool = True, quantization_bit: int | None = None,
                 deepspeed: bool = False) -> RuntimePlan:
    plan = plan_precision(precision, cuda_available, bf16_supported, finetuning_type, optimi_available,
                          quantization_bit, deepspeed)
    attention, reason = choose_attention(disable_flash_attn, flash_attn_ok, cuda_available, plan.compute_dtype,
                                         compute_capability)
    return RuntimePlan(plan, attention, reason, "cuda" if cuda_available else "cpu", 8 if cuda_available else None)


def detect_runtime(args: argparse.Namespace) -> RuntimePlan:
    import torch

    cuda = torch.cuda.is_available()
    return plan_runtime(args.disable_flash_attn, cuda, cuda and torch.cuda.is_bf16_supported(),
                        torch.cuda.get_device_capability() if cuda else None, cuda and flash_attn_importable(),
                        args.precision, args.finetuning_type, optimi_importable(), args.quantization_bit,
                        bool(args.deepspeed))


def wandb_logged_in(environ: dict[str, str]) -> bool:
    """True when W&B has credentials: WANDB_API_KEY or a netrc entry written by ``wandb login``."""
    if environ.get("WANDB_API_KEY"):
        return True
    host = re.sub(r"^https?://", "", environ.get("WANDB_BASE_URL", "api.wandb.ai")).split("/")[0].split(":")[0]
    try:
        return netrc.netrc(environ.get("NETRC") or None).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def configure_reporting(report_to: str | None, environ: dict[str, str],
                        wandb_installed: bool) -> tuple[str, str | None]:
    """Return (report_to for TrainingArguments, message). May set WANDB_MODE=offline in ``environ``.

    W&B without credentials would prompt for a key (or hang without a terminal): switch it to offline mode,
    whose runs land in ./wandb and upload later with ``wandb sync``.
    """
    if report_to is None:
        report_to = "wandb" if wandb_installed else "none"
        if not wandb_installed:
            return "none", "W&B logging off: wandb is not installed (pip install wandb)"
    if report_to == "none":
        return "none", None
    if not wandb_installed:
        raise UsageError("--report_to wandb needs the wandb package (pip install wandb)")
    mode = environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "disabled", "dryrun"):
        return "wandb", f"W&B mode {mode} (from WANDB_MODE)"
    if not wandb_logged_in(environ):
        environ["WANDB_MODE"] = "offline"
        return "wandb", "W&B: no API key / login found, logging offline to ./wandb (upload later: wandb sync)"
    return "wandb", "W&B: logging online"


def output_dir_state(output_dir: str) -> str:
    """'empty' (absent or nothing of ours), 'finished', or 'unfinished' (checkpoints but no final marker)."""
    if not os.path.isdir(output_dir):
        return "empty"
    names = os.listdir(output_dir)
    if FINISHED_MARKER in names:
        return "finished"
    if any(_CHECKPOINT_RE.match(n) for n in names):
        return "unfinished"
    return "empty"


def check_output_dir(output_dir: str, overwrite: bool, resume: str | None) -> None:
    """Never overwrite a previous run silently."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UsageError(f"--output_dir {output_dir} exists and is not a directory")
    state = output_dir_state(output_dir)
    if resume is not None:
        if resume == "latest" and state == "empty":
            raise UsageError(f"--resume_from_checkpoint: no checkpoint-* folder in {output_dir}")
        if resume != "latest" and not os.path.isdir(resume):
            raise UsageError(f"--resume_from_checkpoint {resume}: no such checkpoint folder")
        return
    if overwrite or state == "empty":
        return
    if state == "finished":
        raise UsageError(f"--output_dir {output_dir} already holds a finished run; choose another folder or pass "
                         "--overwrite_output_dir")
    raise UsageError(f"--output_dir {output_dir} holds an unfinished run (checkpoints); pass "
                     "--resume_from_checkpoint to continue it or --overwrite_output_dir to start over")


def remove_previous_run(output_dir: str) -> list[str]:
    """Delete what an earlier run wrote (known names and checkpoint-* only), return what was removed."""
    removed = []
    names = sorted(os.listdir(output_dir)) if os.path.isdir(output_dir) else []
    ours = set(RUN_ARTIFACTS)
    if adapters.ADAPTER_CONFIG in names:  # peft's model card sits beside the adapter it describes
        ours.add(adapters.ADAPTER_MODEL_CARD)
    for name in names:
        path = os.path.join(output_dir, name)
        if name in ours or _CHECKPOINT_RE.match(name):
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            removed.append(name)
    return removed


def optimizer_steps_per_epoch(num_samples: int, batch_size: int, world_size: int, accumulation: int) -> int:
    """As Trainer counts them: micro-batches per rank, grouped by accumulation, a partial group still steps."""
    micro_batches = math.ceil(num_samples / (batch_size * world_size))
    return max(1, math.ceil(micro_batches / accumulation))


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------
@dataclass
class PreparedData:
    data: dl.ReviewData | None  # None after release_texts()
    splits: dict[str, list[dl.Sample]]
    datasets: dict[str, rd.ReviewDataset]  # compact token pieces; samples assembled when read
    truncated_targets: int

    def release_texts(self) -> None:
        """Keep only the compact token arrays (ranks that write no text files need nothing else)."""
        self.data, self.splits = None, {}
        for ds in self.datasets.values():
            ds.release_texts()

    @property
    def encoded(self) -> dict[str, rd.EncodedView]:
        """Per split, the samples as EncodedSample (assembled on access, never all held)."""
        return {name: ds.encoded_samples() for name, ds in self.datasets.items()}

    def features(self, split: str) -> rd.ReviewDataset:
        """Map-style dataset of {"input_ids", "labels"} (plain int lists); ``.lengths`` without assembling."""
        return self.datasets[split]


def load_splits(args: argparse.Namespace) -> tuple[dl.ReviewData, dict[str, list[dl.Sample]]]:
    data = dl.load_review_data(args.data_file)
    splits = dl.split_chronologically(data, args.train_ratio, args.val_ratio, args.test_ratio)
    if not splits["train"]:
        raise UsageError(f"{data.path}: no training samples with --train_ratio {args.train_ratio}")
    return data, splits


def prepare_data(args: argparse.Namespace, data: dl.ReviewData, splits: dict[str, list[dl.Sample]],
                 tokenizer) -> PreparedData:
    """Token pieces for every split. Every torchrun rank runs this itself (cheap and deterministic; see
    review_dataset's docstring for why not rank 0 + a cache)."""
    import review_dataset as rd

    builder = dl.PromptBuilder(args.use_profile, args.use_history)
    datasets = rd.build_datasets(splits, tokenizer, args.max_length, builder)
    train = datasets["train"]
    checked = [train.encoded(i) for i in range(min(PROMPT_CHECK_SAMPLES, len(train)))]
    mismatches = dl.SampleTokenizer(tokenizer, args.max_length, builder).count_text_mismatches(checked)
    if mismatches:
        logger.warning("with this tokenizer %d of the first %d training prompts tokenize differently as text than "
                       "as assembled pieces; evaluation generates from the prompt text", mismatches, len(checked))
    return PreparedData(data, splits, datasets, sum(ds.truncated_targets for ds in datasets.values()))


def write_test_samples(path: str, encoded) -> None:
    """test_samples.json, record by record: the same bytes as ``write_json_atomic(path, [records])`` without
    holding every record (and every test prompt) in memory at once."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            first = True
            for enc in encoded:
                text = json.dumps(dl.sample_record(enc), ensure_ascii=False, indent=2)
                # One level deeper, as inside a list. JSON strings hold no raw newlines, so every line is safe.
                f.write(("[\n" if first else ",\n") + "  " + text.replace("\n", "\n  "))
                first = False
            f.write("[]\n" if first else "\n]\n")

    write_atomic(path, write)


def write_preview(path: str, encoded: list[dl.EncodedSample], total: int) -> None:
    blocks = []
    for i, enc in enumerate(encoded[:PREVIEW_SAMPLES], 1):
        s = enc.sample
        target_tokens = len(enc.input_ids) - enc.prompt_length
        blocks.append(
            f"===== 训练样本 {i}/{total}: {s.user.name} · {s.target.movie} · {s.target.timestamp} =====\n"
            f"tokens: prompt {enc.prompt_length} + target {target_tokens} (含 EOS) = {len(enc.input_ids)}"
            f"; 历史 {enc.history_count}/{len(s.history)} 条" + ("; target 已截断" if enc.target_truncated else "")
            + f"\n----- 输入 (prompt) -----\n{enc.prompt}----- 输出 (target, 计算 loss) -----\n{s.target.text}\n"
        )
    write_text_atomic(path, "\n".join(blocks))


# --------------------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------------------
def epoch_losses(log_history: list[dict[str, Any]]) -> tuple[dict[int, float], dict[int, float]]:
    """Train and eval loss per (rounded) epoch from Trainer's log history; the last value of an epoch wins."""
    train, evaluation = {}, {}
    for entry in log_history:
        if "epoch" not in entry:
            continue
        epoch = max(1, math.ceil(entry["epoch"] - 1e-6))
        if "loss" in entry:
            train[epoch] = entry["loss"]
        if "eval_loss" in entry:
            evaluation[epoch] = entry["eval_loss"]
    return train, evaluation


def loss_points(log_history: list[dict[str, Any]], key: str) -> list[tuple[int, float, float]]:
    """Every logged ``key`` ('loss' or 'eval_loss') as (optimizer step, fractional epoch, value), in order.

    With --eval_steps/--logging_steps there are several per epoch; a resumed run's history continues the
    restored one (the interrupted part of an epoch is never logged), so there are no duplicates.
    """
    return [(e["step"], e["epoch"], e[key]) for e in log_history if key in e and "epoch" in e and "step" in e]


def plot_loss_curve(path: str, log_history: list[dict[str, Any]], title: str) -> None:
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    # Plotted at each value's own (fractional) epoch: per-epoch values land on whole epochs as before, and
    # step-based evaluations (--eval_steps) or logging (--logging_steps) show between them on the same axis.
    train, evaluation = loss_points(log_history, "loss"), loss_points(log_history, "eval_loss")
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    if train:
        ax.plot([p[1] for p in train], [p[2] for p in train], "o-", label="train loss")
    if evaluation:
        ax.plot([p[1] for p in evaluation], [p[2] for p in evaluation], "s-", label="validation loss")
        step, epoch, loss = min(evaluation, key=lambda p: (p[2], p[0]))
        where = f"epoch {round(epoch)}" if abs(epoch - round(epoch)) < 1e-6 else f"step {step}"
        ax.axvline(epoch, color="gray", linestyle="--", linewidth=1)
        ax.plot([epoch], [loss], "*", markersize=16, color="crimson", label=f"best {where} ({loss:.4f})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (review tokens + EOS)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


# --------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------
def hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """Can we open a connection to the model hub? Answers in seconds instead of a minute of retries."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(endpoint)
    try:
        with socket.create_connection((url.hostname or "", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def model_source(model_path: str, environ: dict[str, str]) -> tuple[str, bool]:
    """Return (path or hub id, local_files_only). A hub id with no reachable hub is read from the local cache."""
    path = os.path.expanduser(model_path)
    looks_local = os.path.isabs(model_path) or model_path.startswith((".", "~")) or os.path.exists(path)
    if looks_local:
        if not os.path.isdir(path):
            raise UsageError(f"--model_path {model_path}: no such local folder")
        return path, True
    offline = environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    # Behind a proxy a direct connection proves nothing: leave the decision to huggingface_hub then.
    proxied = any(environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))
    if not offline and not proxied and not hub_reachable(environ.get("HF_ENDPOINT", "https://huggingface.co")):
        logger.warning("model hub unreachable: looking for %s in the local Hugging Face cache only", model_path)
        offline = True
    return path, offline


def load_tokenizer(args, source: str, local_only: bool):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=args.trust_remote_code,
                                                  local_files_only=local_only)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"cannot load model {args.model_path!r} ({first[:160]}). Without access to the model hub "
                         "pass a local folder: --model_path /path/to/Qwen2.5-3B") from None
    if tokenizer.pad_token is None:  # pad only fills batches; labels never depend on it
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def signal_name(signum: int) -> str:
    import signal

    return signal.Signals(signum).name


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO if rank == 0 else logging.WARNING)
    try:
        return train(args, rank)
    except (UsageError, dl.ReviewDataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def train(args: argparse.Namespace, rank: int) -> int:
    dl.check_ratios(args.train_ratio, args.val_ratio, args.test_ratio)
    # A torchrun restart (--max-restarts) of this worker group continues the run by itself; a first start is
    # judged by check_output_dir as always. Checkpoints are only resumed from when complete.
    restarts = ft.restart_count(os.environ)
    start = ft.plan_start(output_dir_state(args.output_dir), args.resume_from_checkpoint, args.overwrite_output_dir,
                          restarts)
    if start.action == "finished":
        if rank == 0:
            logger.warning("torchrun restart %d: %s already holds the finished run; nothing to do", restarts,
                           args.output_dir)
        return 0
    if start.action == "check":
        check_output_dir(args.output_dir, args.overwrite_output_dir, args.resume_from_checkpoint)
    resume = ft.resolve_resume(start.resume, args.output_dir, restarts,
                               log=logger.warning if rank == 0 else lambda message: None)
    if rank == 0 and restarts:
        logger.warning("torchrun restart %d of the worker group: %s", restarts,
                       f"resuming from {resume}" if resume else "no complete checkpoint yet, starting from scratch")
    elif rank == 0 and resume:
        logger.info("resuming from %s", resume)
    quantization, shard_plan = plan_scaling(args, resume)  # LoRA/QLoRA/sharding conflicts: before data and model load
    report_to, report_msg = configure_reporting(args.report_to, os.environ,
                                                importlib.util.find_spec("wandb") is not None)
    plan = detect_runtime(args)  # flag/hardware conflicts are refused here, before data or model load
    ft.isolate_restarted_process_group(os.environ)  # a torchrun restart must not meet the dead group's store keys
    # Data errors surface before the (slow) model load; nothing is written until everything has loaded.
    data, splits = load_splits(args)
    ft.checkpoint_schedule(args.save_steps, args.eval_steps, bool(splits["val"]))  # refuse bad steps before loading

    import transformers

    transformers.logging.set_verbosity_warning()
    source, local_only = model_source(args.model_path, os.environ)
    tokenizer = load_tokenizer(args, source, local_only)
    prepared = prepare_data(args, data, splits, tokenizer)
    if rank != 0:  # only rank 0 writes text files (preview, test samples, config): the others keep the arrays
        del data, splits
        prepared.release_texts()
    facts = run_facts(args, prepared, plan, int(os.environ.get("WORLD_SIZE", "1")), report_to)
    facts["resumed_from"] = resume
    model = None if args.preview_only else load_model(args, source, local_only, plan, quantization)
    facts.update(adapters.describe(args, model, quantization), sharding=shard_plan.describe())

    if rank == 0:
        start_output_dir(args, prepared, facts, report_msg, remove_previous=start.remove_previous)
    if args.preview_only:
        if rank == 0:
            logger.info("--preview_only: wrote training_samples_preview.txt and test_samples.json to %s",
                        args.output_dir)
        return 0

    if rank == 0 and report_to == "wandb":  # a resumed run keeps logging into the same W&B run
        ft.configure_wandb_resume(os.environ, ft.wandb_run_id(args.output_dir, resuming=bool(resume or restarts)))
    trainer = build_trainer(args, model, tokenizer, prepared, plan, report_to,
                            sharding_kwargs(args, model, shard_plan))
    stop = ft.graceful_stop_callback()  # SIGTERM/SIGINT: finish the step, checkpoint, exit non-zero
    trainer.add_callback(stop)
    result = trainer.train(resume_from_checkpoint=resume)
    if stop.signum:
        if trainer.is_world_process_zero():
            script = sys.argv[0] if sys.argv[0].endswith(".py") else os.path.basename(__file__)
            logger.warning("stopped by %s after optimizer step %d; checkpoint %s. To resume: %s",
                           signal_name(stop.signum), stop.stopped_step, stop.checkpoint,
                           ft.resume_command(sys.argv[1:], script, os.environ))
        return stop.exit_code
    save_final_model(args, trainer, merge_base=(source, local_only, plan.weights_dtype))
    if trainer.is_world_process_zero():
        outcome = summarize_run(args, trainer, result, has_val=bool(prepared.encoded["val"]))
        config = {
            "arguments": vars(args),
            "resolved": facts,
            "data": {
                "file": ", ".join(os.path.abspath(p) for p in args.data_file),
                "files": [os.path.abspath(f) for f in prepared.data.files],  # every file read (dirs expanded)
                "users": len(prepared.data.users),
                "reviews": prepared.data.num_reviews, "splits": dl.split_summary(prepared.splits),
            },
            "result": outcome,
            "versions": library_versions(("torch", "transformers", "accelerate", "peft", "wandb", "flash-attn",
                                          "torch-optimi", "bitsandbytes", "deepspeed")),
        }
        write_json_atomic(os.path.join(args.output_dir, FINISHED_MARKER), config)
        log_end_summary(args, outcome)
    return 0


def load_model(args, source: str, local_only: bool, plan: RuntimePlan,
               quantization: adapters.QuantizationPlan | None = None):
    import torch
    from transformers import AutoModelForCausalLM

    try:
        # safetensors first; a .bin is read with torch.load(weights_only=True) by transformers 5.
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=getattr(torch, plan.weights_dtype), attn_implementation=plan.attention,
            trust_remote_code=args.trust_remote_code, local_files_only=local_only,
            # transformers 5.24 probes the hub for an adapter_config.json without passing local_files_only on
            # (~30 s of retries with the hub unreachable).
            adapter_kwargs={"local_files_only": local_only},
            **adapters.quantization_load_kwargs(quantization, int(os.environ.get("LOCAL_RANK", "0"))))
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot load model weights from {args.model_path!r}: {str(err).splitlines()[0][:200]}") \
            from None
    # Full fine-tuning: the model as loaded; LoRA / QLoRA: adapters on the frozen base (peft).
    return adapters.wrap_model(model, args, adapters.base_model_reference(args.model_path, source),
                               quantized=quantization is not None)


def plan_scaling(args, resume: str | None) -> tuple[adapters.QuantizationPlan | None, sharding.ShardingPlan]:
    """Check the LoRA / QLoRA / sharding flags against each other and the hardware: one line, nothing loaded."""
    adapters.check_flags(args)
    sharding.check_combinations(args.fsdp, args.deepspeed, args.quantization_bit)
    adapters.check_resume(resume, args.finetuning_type)
    cuda = bf16 = False
    if args.quantization_bit is not None or args.fsdp or args.deepspeed:  # torch is imported only when needed
        import torch

        cuda = torch.cuda.is_available()
        # QLoRA's 4-bit matmuls compute in the run's half precision: bf16 unless fp16-mixed was asked for.
        bf16 = cuda and torch.cuda.is_bf16_supported() and args.precision != "fp16-mixed"
    ds_config = sharding.load_deepspeed_config(args.deepspeed) if args.deepspeed else None
    shard_plan = sharding.plan_sharding(args.fsdp, args.deepspeed, ds_config, args.quantization_bit, cuda,
                                        bool(args.deepspeed) and sharding.deepspeed_importable())
    quantization = adapters.plan_quantization(args.quantization_bit, args.finetuning_type, cuda,
                                              args.quantization_bit is not None and adapters.bitsandbytes_importable(),
                                              bf16)
    return quantization, shard_plan


def sharding_kwargs(args, model, shard_plan: sharding.ShardingPlan) -> dict[str, Any]:
    """TrainingArguments kwargs of the sharding plan; FSDP wraps the model's own decoder-layer class."""
    if shard_plan.kind != "fsdp":
        return sharding.training_kwargs(shard_plan, set(), args.gradient_checkpointing)
    return sharding.training_kwargs(shard_plan, adapters.decoder_layer_classes(model), args.gradient_checkpointing,
                                    sharding.fsdp_version(sharding.torch_supports_fsdp2()))


def efficiency_plan(args, plan: RuntimePlan):
    """Packing and completion-only logits: on by default, off by flag or where they cannot be trusted."""
    import completion_training as ct

    return ct.plan_efficiency(args.disable_packing, args.disable_completion_only_logits, plan.attention,
                              args.trust_remote_code)


def run_facts(args, prepared: PreparedData, plan: RuntimePlan, world_size: int, report_to: str) -> dict[str, Any]:
    steps_per_epoch = optimizer_steps_per_epoch(len(prepared.encoded["train"]), args.batch_size, world_size,
                                                args.gradient_accumulation_steps)
    return {
        "precision": plan.precision.mode, "precision_reason": plan.precision.reason,
        "optimizer": plan.precision.optimizer, "optimizer_reason": plan.precision.optimizer_reason,
        "dtype": plan.weights_dtype, "attention": plan.attention,
        "attention_reason": plan.attention_reason, "device": plan.device, "world_size": world_size,
        "effective_batch_size": args.batch_size * args.gradient_accumulation_steps * world_size,
        "optimizer_steps_per_epoch": steps_per_epoch, "max_optimizer_steps": steps_per_epoch * args.max_epochs,
        "report_to": report_to, "truncated_targets": prepared.truncated_targets,
        **efficiency_plan(args, plan).facts(),
    }


def start_output_dir(args, prepared: PreparedData, facts: dict[str, Any], report_msg: str | None,
                     remove_previous: bool | None = None) -> None:
    """Rank 0, before training: clear an overwritten run, say what will happen, write the data files.

    The data files come out byte-identical for the same arguments and data, so a resumed or restarted run
    rewrites them (atomically) to the same content."""
    if remove_previous is None:
        remove_previous = args.overwrite_output_dir and args.resume_from_checkpoint is None
    if remove_previous:
        removed = remove_previous_run(args.output_dir)
        if removed:
            logger.warning("--overwrite_output_dir: removed the previous run's %s", ", ".join(removed))
    os.makedirs(args.output_dir, exist_ok=True)
    log_start_summary(args, prepared, facts, report_msg)
    if not prepared.encoded["val"]:
        logger.warning("the validation split is empty: training all %d epochs without early stopping",
                       args.max_epochs)
    total, per_epoch = facts["max_optimizer_steps"], facts["optimizer_steps_per_epoch"]
    if args.warmup_steps >= total:
        logger.warning("--warmup_steps %d >= the %d optimizer steps of the whole run (%d per epoch): the "
                       "learning rate never reaches %g. Consider --warmup_steps %d.", args.warmup_steps,
                       total, per_epoch, args.learning_rate, max(1, total // 10))
    if prepared.truncated_targets:
        logger.warning("%d target reviews were longer than --max_length and were truncated",
                       prepared.truncated_targets)
    write_preview(os.path.join(args.output_dir, "training_samples_preview.txt"), prepared.encoded["train"],
                  len(prepared.encoded["train"]))
    write_test_samples(os.path.join(args.output_dir, "test_samples.json"), prepared.encoded["test"])


def build_trainer(args, model, tokenizer, prepared: PreparedData, plan: RuntimePlan, report_to: str,
                  extra_training_kwargs: dict[str, Any] | None = None):
    from transformers import EarlyStoppingCallback, TrainingArguments

    import completion_training as ct
    import review_dataset as rd

    has_val = bool(prepared.encoded["val"])
    efficiency = efficiency_plan(args, plan)
    if efficiency.completion_only_logits and not ct.model_accepts_logits_to_keep(model):
        raise UsageError(f"{args.model_path}: the model's forward takes no logits_to_keep; pass "
                         "--disable_completion_only_logits")
    if report_to == "wandb":  # transformers' W&B callback reads the project from the environment
        os.environ["WANDB_PROJECT"] = args.wandb_project
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        num_train_epochs=args.max_epochs,
        warmup_steps=args.warmup_steps,
        lr_scheduler_type="linear",
        # Evaluation and checkpoints per epoch (28 reviews = ~2 steps an epoch), or every --save_steps/--eval_steps.
        **ft.checkpoint_schedule(args.save_steps, args.eval_steps, has_val),
        restore_callback_states_from_checkpoint=True,  # a resume keeps early stopping's patience count
        save_total_limit=2,  # with load_best_model_at_end Trainer keeps the best checkpoint plus the latest
        load_best_model_at_end=has_val,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        logging_strategy="steps" if args.logging_steps else "epoch",
        logging_steps=args.logging_steps or 500,
        report_to=report_to,
        run_name=args.wandb_run_name or os.path.basename(os.path.normpath(args.output_dir)),
        seed=args.seed,
        # Length grouping only where batches are padded (not packed): similar lengths, little padding.
        train_sampling_strategy=efficiency.train_sampling_strategy,
        ddp_find_unused_parameters=False,
        # Under FSDP, checkpointing is FSDP's own (fsdp_config), which avoids a redundant all-gather.
        activation_checkpointing=args.gradient_checkpointing and not args.fsdp,
        remove_unused_columns=False,
        **plan.training_kwargs(),
        **(extra_training_kwargs or {}),  # FSDP / DeepSpeed (sharding.training_kwargs)
    )
    # Length grouping reads the datasets' precomputed lengths instead of assembling every sample to measure it.
    return rd.with_dataset_lengths(ct.CompletionTrainer)(
        model=model,
        args=training_args,
        train_dataset=prepared.features("train"),
        eval_dataset=prepared.features("val") if has_val else None,
        # One packed row per micro-batch, or dynamic padding (each batch to its longest sample, labels -100).
        data_collator=ct.make_data_collator(tokenizer, efficiency.packing, plan.pad_to_multiple_of),
        processing_class=tokenizer,
        optimizer_cls_and_kwargs=plan.precision.optimizer_cls_and_kwargs(args.learning_rate),
        callbacks=[EarlyStoppingCallback(args.early_stopping_patience)] if has_val else [],
        completion_only_logits=efficiency.completion_only_logits,
    )


def save_final_model(args, trainer, merge_base: tuple[str, bool, str] | None = None) -> None:
    """Save the (best) model on every rank's call, as Trainer expects; rank 0 writes the files.

    Full fine-tuning: the weights (gathered whole under FSDP / ZeRO-3 by save_model). LoRA: the adapter, and with
    --merge_lora the merged model in merged/, re-built from ``merge_base`` = (source, local_only, dtype).
    """
    # Trainer turned the KV cache off for training and would save that into config.json: generation wants it on.
    trainer.model.config.use_cache = True
    trainer.save_model(args.output_dir)
    if not trainer.is_world_process_zero():
        return
    if args.finetuning_type == "lora":
        if args.merge_lora and merge_base:
            source, local_only, dtype = merge_base
            folder = adapters.save_merged_model(
                args.output_dir, source, local_only, dtype, args.trust_remote_code,
                lambda model, out: write_plain_model(model, trainer.processing_class, out, args.save_format))
            logger.info("--merge_lora: merged model written to %s", folder)
        return
    if args.save_format == "bin":
        # transformers 5 only writes safetensors; the spec's pytorch_model.bin is re-written from what save_model
        # wrote (whole weights even when training was sharded), which from_pretrained still reads.
        sharding.full_weights_to_bin(args.output_dir)


def write_plain_model(model, tokenizer, folder: str, save_format: str) -> None:
    """A folder plain from_pretrained loads: config, weights in --save_format, tokenizer."""
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if save_format == "bin":
        sharding.full_weights_to_bin(folder)


def summarize_run(args, trainer, result, has_val: bool) -> dict[str, Any]:
    history = trainer.state.log_history
    train_losses, eval_losses = epoch_losses(history)
    evaluations = loss_points(history, "eval_loss")
    # The best evaluation overall: with --eval_steps an epoch's last evaluation need not be its best one.
    best_step, best_at, best_loss = min(evaluations, key=lambda p: (p[2], p[0])) if evaluations else (None, 0, None)
    best = max(1, math.ceil(best_at - 1e-6)) if evaluations else None
    plot_loss_curve(os.path.join(args.output_dir, "loss_curve.png"), history,
                    f"{os.path.basename(os.path.normpath(args.output_dir))}: loss per epoch")
    epochs_run = max(train_losses) if train_losses else 0
    outcome = {
        "epochs_run": epochs_run,
        # Early stopping may also stop mid-epoch (--eval_steps): compare steps, not epochs.
        "stopped_early": has_val and trainer.state.global_step < trainer.state.max_steps,
        "best_epoch": best,
        "best_eval_loss": best_loss,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "global_steps": trainer.state.global_step,
        "train_loss_per_epoch": train_losses,
        "eval_loss_per_epoch": eval_losses,
        "train_runtime_s": round(result.metrics.get("train_runtime", 0.0), 2),
    }
    if args.eval_steps or args.save_steps:  # step-based evaluation: every evaluation, by optimizer step
        outcome["best_step"] = best_step
        outcome["eval_loss_per_step"] = {step: loss for step, _, loss in evaluations}
    return outcome


def data_source(data: dl.ReviewData) -> str:
    """The input as given, plus how many files it expanded to when that is not obvious."""
    files = len(data.files)
    return data.path if files <= 1 or data.path == ", ".join(data.files) else f"{data.path} ({files} files)"


def log_start_summary(args, prepared: PreparedData, facts: dict[str, Any], report_msg: str | None) -> None:
    splits = dl.split_summary(prepared.splits)
    rows = [
        f"data        {data_source(prepared.data)}: {len(prepared.data.users)} user(s), "
        f"{prepared.data.num_reviews} reviews",
        *(f"  {n:<5}     {i['samples']:>5} samples  {i['time_range'][0] + ' ~ ' + i['time_range'][1] if i['time_range'] else '-'}"
          for n, i in splits.items()),
        f"prompt      profile={'on' if args.use_profile else 'off'} history={'on' if args.use_history else 'off'}"
        f" max_length={args.max_length}",
        f"model       {args.model_path}  ({facts['device']}, weights {facts['dtype']})",
        f"precision   {facts['precision']}: {facts['precision_reason']}",
        f"optimizer   {facts['optimizer']}: {facts['optimizer_reason']}",
        f"attention   {facts['attention']}: {facts['attention_reason']}",
        f"packing     {'on' if facts['packing'] else 'off'}: {facts['packing_reason']}",
        f"logits      {'labelled positions only' if facts['completion_only_logits'] else 'every position'}: "
        f"{facts['completion_only_logits_reason']}",
        *scaling_summary_rows(facts),
        f"processes   world size {facts['world_size']}; effective batch {args.batch_size} x "
        f"{args.gradient_accumulation_steps} x {facts['world_size']} = {facts['effective_batch_size']}",
        f"steps       {facts['optimizer_steps_per_epoch']} optimizer steps/epoch, up to {args.max_epochs} epochs "
        f"({facts['max_optimizer_steps']} steps), warmup {args.warmup_steps}",
        f"output      {args.output_dir}",
    ]
    if report_msg:
        rows.append(f"tracking    {report_msg}")
    logger.info("training setup\n" + "\n".join("  " + r for r in rows))


def scaling_summary_rows(facts: dict[str, Any]) -> list[str]:
    """Start-summary rows for the fine-tuning type, trainable parameters and sharding."""
    kind = facts.get("finetuning_type", "full")
    if facts.get("quantization"):
        kind += f" on a {facts['quantization']} base (QLoRA)"
    rows = [f"finetuning  {kind}"]
    if facts.get("total_params"):
        trainable, total = facts["trainable_params"], facts["total_params"]
        rows[0] += f": {trainable:,} of {total:,} parameters trainable ({100 * trainable / total:.2f}%)"
    if facts.get("lora_target"):
        rows.append(f"lora        targets {', '.join(facts['lora_target'])}")
    rows.append(f"sharding    {facts.get('sharding', 'none')}")
    return rows


def log_end_summary(args, outcome: dict[str, Any]) -> None:
    where = f"step {outcome['best_step']}" if outcome.get("best_step") else f"epoch {outcome['best_epoch']}"
    best = (f"best {where} (val loss {outcome['best_eval_loss']:.4f})"
            if outcome["best_epoch"] else "no validation split: final epoch saved")
    stop = "stopped early" if outcome["stopped_early"] else "ran all epochs"
    logger.info("training done: %d epoch(s), %s; %s\n  model and run files: %s\n  loss curve: %s",
                outcome["epochs_run"], stop, best, os.path.abspath(args.output_dir),
                os.path.join(args.output_dir, "loss_curve.png"))


if __name__ == "__main__":
    sys.exit(main())
