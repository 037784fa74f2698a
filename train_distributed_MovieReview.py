"""Fine-tune a causal LM to write Douban movie reviews in one user's style, from their dated review history.

One script for one device and for many::

    python train_distributed_MovieReview.py --data_file example_movie_review_data.json --output_dir outputs/Y
    torchrun --nproc_per_node=4 train_distributed_MovieReview.py --data_file ... --output_dir ...

The story of a run: arguments -> plan (``review_lm.training.plan``: every decision, once, before anything slow)
-> the run folder (``review_lm.runs``: lock, fingerprint, restarts, checkpoints) -> data (``review_lm.data``: the
loader's prompts, token pieces stored once) -> model (``training.model_setup``; ``adapters`` for LoRA/QLoRA) ->
transformers' ``Trainer`` (``training.completion_training``: packed rows, loss and LM head on the review + EOS only;
DDP under torchrun, FSDP/DeepSpeed via ``training.sharding``; evaluation, a checkpoint every epoch and early
stopping; ``training.graceful_stop`` for SIGTERM) -> the best model saved and the run recorded (``runs.run_folder``,
``training.report``). FlashAttention 2 is used where it can run, PyTorch SDPA otherwise.

Outputs (output_dir): pytorch_model.bin (or model.safetensors), config.json, tokenizer files,
training_config.json, test_samples.json, training_samples_preview.txt, loss_curve.png, checkpoint-*/.
LoRA / QLoRA runs write an adapter instead of the weights, plus merged/ with --merge_lora;
FSDP / DeepSpeed ZeRO sharding gathers whole weights for the final save.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
from typing import TYPE_CHECKING, Any

import data_loader_movie_review as dl
from review_lm.inference import model_loading as ml
from review_lm.runs import checkpoints, disk_space, fingerprint, launch, restart, run_folder, test_set
from review_lm.runs import lock as run_lock
from review_lm.training import (
    adapters,
    graceful_stop,
    lm_head_plan,
    model_setup,
    process_group,
    progress,
    sharding,
    tracking,
)
from review_lm.training import report as run_report
from review_lm.training.plan import (
    CHAT_TEMPLATE_FLAGS,
    PROMPT_FORMATS,
    RunPlan,
    plan_hardware,
    probe_hardware,
    resolve_chat_template,
    validate_arguments,
)
from review_lm.training.precision import PRECISIONS
from review_lm.utils import (
    ArgumentParser,
    Interrupted,
    UsageError,
    check_output_path,
    deferred_interrupts,
    install_interrupt_handlers,
    interrupt_point,
    write_text_atomic,
)

if TYPE_CHECKING:  # the datasets need the tokenizer: loaded only once the data has been validated
    from review_lm.data import datasets as rd

logger = logging.getLogger("movie_review")
PREVIEW_SAMPLES = 3
WORLD_SIZE = int(os.environ.get("WORLD_SIZE", "1"))


# --------------------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(
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
    model.add_argument("--prompt_format", choices=PROMPT_FORMATS, default="spec",
                       help="spec: one sample per review repeating the whole earlier history (the spec's prompt); "
                            "conversation: one sequence per user, every review an assistant turn (O(N) tokens)")
    model.add_argument("--chat_template", choices=CHAT_TEMPLATE_FLAGS, default=None,
                       help="auto: the tokenizer's own chat template when it has one (Instruct models); none: the "
                            "built-in ChatML layout (conversation) / the plain spec prompt (spec). Default: none "
                            "for spec, auto for conversation")

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
                       help="log the training loss every N optimizer steps (0: about 5 times per epoch); always "
                            "also at the first step and at the end of every epoch")
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
    run.add_argument("--disable_flash_attn", action="store_true",
                     help="use PyTorch SDPA even if FlashAttention 2 works")
    run.add_argument("--precision", choices=PRECISIONS, default="auto",
                     help="auto: bf16-mixed on a bf16 GPU (fp32 master weights, bf16 compute), fp16-mixed on "
                          "older GPUs, fp32 on CPU. bf16-pure: bf16 weights + Kahan-compensated AdamW (less memory)")
    run.add_argument("--disable_packing", action="store_true",
                     help="pad each micro-batch to its longest sample instead of packing it into one row")
    run.add_argument("--disable_completion_only_logits", action="store_true",
                     help="compute the LM head at every position, not only where the next token is labelled")
    # Hidden: the kept logits built whole (the path before chunking) for comparisons; auto is right for users.
    run.add_argument("--lm_head_loss", choices=lm_head_plan.REQUESTS, default="auto", help=argparse.SUPPRESS)
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
    run.add_argument("--keep_checkpoints", choices=run_folder.KEEP_CHECKPOINTS, default="all",
                     help="after a successful finish: all = keep what the run kept (the best and the latest "
                          "checkpoint), best = only the best one, none = no checkpoint (the final model stays); a "
                          "stopped or failed run keeps everything needed to resume")
    run.add_argument("--save_format", choices=["bin", "safetensors"], default="bin",
                     help="final weights as pytorch_model.bin (spec) or model.safetensors")
    adapters.add_arguments(p)
    sharding.add_arguments(p)
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO if rank == 0 else logging.WARNING)
    install_interrupt_handlers()  # until training's graceful stop takes over: one line, 128 + signal
    try:
        return train(args, rank)
    except (UsageError, dl.ReviewDataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Interrupted as stop:
        print(f"error: {stop}", file=sys.stderr)
        return stop.exit_code


def train(args: argparse.Namespace, rank: int) -> int:
    validate_arguments(args)  # every flag check that needs neither data nor hardware
    check_output_path(args.output_dir, "--output_dir")  # a file in the way, read-only, full: before the lock
    interrupt_point("arguments_checked")
    # One run per output folder, for the run's whole life: taken before anything slow, released on any exit.
    with run_lock.RunLock(args.output_dir, launch.launch_id(), log=logger.warning) as lock:
        start = restart.decide_start(args, lock, WORLD_SIZE, skipped=logger.warning if rank == 0 else None)
        if rank == 0:
            for message in start.messages:
                logger.warning(message)
        if start.finished:
            return 0
        if rank == 0:
            restarts = launch.restart_count(os.environ)
            if restarts and start.plan.action == "resume":
                logger.warning("torchrun restart %d of the worker group: %s", restarts, f"resuming from {start.resume}"
                               if start.resume else "no complete checkpoint yet, starting from scratch")
            elif start.resume:
                logger.info("resuming from %s", start.resume)
            if start.resume:
                disk_space.remove_partial_checkpoints(args.output_dir, log=logger.warning)
            restart.record_start(args.output_dir, start, lock.run_id, args.max_epochs)
        try:
            return run(args, rank, start, lock)
        except (UsageError, dl.ReviewDataError, Interrupted):
            if rank == 0 and not os.path.exists(run_folder.path(args.output_dir, run_folder.TEST_SAMPLES)):
                restart.undo_record_start(args.output_dir, start)  # nothing of this run was written yet
            raise


def run(args: argparse.Namespace, rank: int, start: restart.RunStart, lock: run_lock.RunLock) -> int:
    resume = start.resume
    # Data errors surface first, before torch is imported (the hardware probe) and before the (slow) model load;
    # nothing is written until everything has loaded.
    data, splits = load_splits(args)
    interrupt_point("data_loaded")
    report_to, report_msg = tracking.configure_reporting(args.report_to, os.environ,
                                                         importlib.util.find_spec("wandb") is not None)
    plan = plan_hardware(args, probe_hardware(args), WORLD_SIZE, report_to, report_msg, resume)
    plan = plan.with_splits(args, bool(splits["val"]))  # a bad --save_steps / --eval_steps pair stops here
    process_group.isolate_restarted_process_group(os.environ)  # a restart must not meet the dead group's store keys
    import transformers

    from review_lm.data import datasets as rd

    transformers.logging.set_verbosity_warning()
    if not progress.stderr_is_terminal():  # no bar redraws (\r) from loading and saving in a log file
        transformers.utils.logging.disable_progress_bar()
    source, local_only = ml.resolve_model_source(args.model_path, os.environ,
                                                 f"--model_path {args.model_path}: no such local folder")
    tokenizer = model_setup.load_training_tokenizer(args.model_path, source, local_only, args.trust_remote_code)
    template = resolve_chat_template(args.prompt_format, args.chat_template, bool(tokenizer.chat_template))
    prepared = rd.prepare_data(data, splits, tokenizer, args.max_length,
                               dl.PromptBuilder(args.use_profile, args.use_history), args.prompt_format, template)
    # Optimizer steps count sequences: a conversation run's are its windows, known once tokenized.
    plan = plan.with_steps(args, prepared.size("train"))
    if rank != 0:  # only rank 0 writes text files (preview, test samples, record): the others keep the arrays
        del data, splits
        prepared.release_texts()
    model = None if args.preview_only else model_setup.load_training_model(args, source, local_only, plan)
    interrupt_point("model_loaded")  # the last point before a previous run may be replaced
    model_facts = adapters.describe(args, model)
    if model is not None:  # the logits chunk follows the head's width; its memory is told next to the model's
        plan = plan.with_vocab(model.config.get_text_config().vocab_size)
        model_facts.update(lm_head_plan.memory_facts(
            plan.lm_head, model_facts.get("total_params"), plan.runtime.weights_dtype,
            prepared.datasets["train"].labelled_tokens(), prepared.size("train"), args.batch_size, args.max_length))
    data_facts = prepared.data_facts(plan.steps_per_epoch)  # the start summary and the record print the same
    if rank == 0:
        start_output_dir(args, prepared, plan, model_facts, data_facts, start, lock)
    if args.preview_only:
        if rank == 0:
            logger.info("--preview_only: wrote %s and %s to %s", run_folder.PREVIEW, run_folder.TEST_SAMPLES,
                        args.output_dir)
        return 0

    if rank == 0 and report_to == "wandb":  # a resumed run keeps logging into the same W&B run
        tracking.configure_wandb_resume(os.environ, tracking.wandb_run_id(args.output_dir, resuming=bool(resume)))
    precision = plan.precision
    needed = disk_space.run_bytes(model_facts["total_params"], model_facts["trainable_params"],
                                  precision.weights_dtype, precision.optimizer, args.finetuning_type, args.save_format,
                                  bool(args.deepspeed))
    if rank == 0 and (warning := disk_space.check_disk_space(args.output_dir, needed)):
        logger.warning(warning)
    trainer = build_trainer(args, model, tokenizer, prepared, plan)
    stop = graceful_stop.graceful_stop_callback()  # SIGTERM/SIGINT: finish the step, checkpoint, exit non-zero
    trainer.add_callback(stop)
    try:
        result = trainer.train(resume_from_checkpoint=resume)
        if stop.signum:
            resume_cmd = checkpoints.resume_command(sys.argv[1:], script_name(), os.environ)
            graceful_stop.report_stop(trainer, stop, resume_cmd)
            return stop.exit_code
        save_final_model(args, trainer, merge_base=(source, local_only, plan.runtime.weights_dtype))
    except Exception as err:  # a full disk, a lost mount: one line with the way back, not a traceback
        if not disk_space.is_save_failure(err):
            raise
        command = checkpoints.resume_command(sys.argv[1:], script_name(), os.environ)
        raise disk_space.save_failure(args.output_dir, rank, err, needed, command) from None
    if trainer.is_world_process_zero():
        outcome = run_report.summarize_run(args, trainer, result, plan.has_val)
        record = run_folder.run_record(args, prepared.data, prepared.splits, {
            **plan.record(), "truncated_targets": prepared.truncated_targets, **model_facts, **data_facts}, outcome,
            fingerprint.fingerprint_digest(start.fingerprint))
        run_folder.write_run_record(args.output_dir, record)
        removed, freed = run_folder.remove_checkpoints(args.output_dir, args.keep_checkpoints,
                                                       outcome["best_checkpoint"])
        if removed:
            logger.info("--keep_checkpoints %s: removed %s (%s)", args.keep_checkpoints, ", ".join(removed),
                        disk_space.human_bytes(freed))
        run_report.log_end_summary(args, outcome)
    return 0


# --------------------------------------------------------------------------------------------------------------
# Data and the run folder
# --------------------------------------------------------------------------------------------------------------
def load_splits(args: argparse.Namespace) -> tuple[dl.ReviewData, dict[str, list[dl.Sample]]]:
    data = dl.load_review_data(args.data_file)
    splits = dl.split_chronologically(data, args.train_ratio, args.val_ratio, args.test_ratio)
    if not splits["train"]:
        raise UsageError(f"{data.path}: no training samples with --train_ratio {args.train_ratio}")
    return data, splits


def start_output_dir(args, prepared: rd.PreparedData, plan: RunPlan, model_facts: dict[str, Any],
                     data_facts: dict[str, Any], start: restart.RunStart, lock: run_lock.RunLock) -> None:
    """Rank 0, before training: clear an overwritten run, say what will happen, write the data files.

    The data files come out byte-identical for the same arguments and data, so a resumed or restarted run
    rewrites them (atomically) to the same content."""

    interrupt_point("output_dir")
    logger.info(run_report.start_summary(args, prepared.data, prepared.splits, plan, model_facts, data_facts))
    for warning in run_report.start_warnings(args, plan, prepared):
        logger.warning(warning)
    preview = prepared.datasets["train"].preview_text(PREVIEW_SAMPLES)
    records = prepared.datasets["test"].prompt_records()
    # Everything slow is done: a signal from here on waits (blocked, not lost) until the new run's files are in
    # place, so a previous run is never removed without the new one replacing it.
    with deferred_interrupts():
        if start.plan.remove_previous:
            removed = run_folder.remove_previous_run(args.output_dir)  # renamed aside, then deleted
            if removed:
                logger.warning("--overwrite_output_dir: removed the previous run's %s", ", ".join(removed))
            restart.record_cleared(args.output_dir, start, lock.run_id, args.max_epochs)
            interrupt_point("previous_run_removed")
        os.makedirs(args.output_dir, exist_ok=True)
        out = args.output_dir
        digest = fingerprint.fingerprint_digest(start.fingerprint)  # both files name the run: a mix-up is caught
        write_text_atomic(run_folder.path(out, run_folder.PREVIEW), preview)
        test_set.write_test_samples(run_folder.path(out, run_folder.TEST_SAMPLES), records, digest)
        test_set.write_test_histories(run_folder.path(out, run_folder.TEST_HISTORIES), prepared.splits["test"],
                                      digest)


# --------------------------------------------------------------------------------------------------------------
# Model and Trainer
# --------------------------------------------------------------------------------------------------------------
def build_trainer(args, model, tokenizer, prepared: rd.PreparedData, plan: RunPlan):
    from transformers import EarlyStoppingCallback, PrinterCallback, ProgressCallback, TrainingArguments

    from review_lm.training import chunked_loss, samplers
    from review_lm.training import completion_training as ct

    has_val, efficiency = plan.has_val, plan.efficiency
    if efficiency.completion_only_logits and not ct.model_accepts_logits_to_keep(model):
        raise UsageError(f"{args.model_path}: the model's forward takes no logits_to_keep; pass "
                         "--disable_completion_only_logits")
    if plan.lm_head.kind != "unchunked" and chunked_loss.plain_head(model) is None:
        raise UsageError(f"{args.model_path}: the LM head is not a plain linear layer, so head + loss cannot run "
                         "outside the model's forward; pass --lm_head_loss unchunked")
    if plan.report_to == "wandb":
        tracking.configure_wandb_project(os.environ, args.wandb_project)
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
        **plan.schedule,
        restore_callback_states_from_checkpoint=True,  # a resume keeps early stopping's patience count
        save_total_limit=checkpoints.CHECKPOINTS_KEPT,  # with load_best_model_at_end: the best one plus the latest
        load_best_model_at_end=has_val,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        # The loss at the first step, a handful of times per epoch and at each epoch's end (training.progress).
        logging_strategy="steps",
        logging_steps=plan.logging_steps,
        logging_first_step=True,
        disable_tqdm=not progress.stderr_is_terminal(),  # no bars (and no escape sequences) in a log file
        report_to=plan.report_to,
        run_name=args.wandb_run_name or os.path.basename(os.path.normpath(args.output_dir)),
        seed=args.seed,
        # Length grouping only where batches are padded (not packed): similar lengths, little padding.
        train_sampling_strategy=efficiency.train_sampling_strategy,
        ddp_find_unused_parameters=False,
        # Under FSDP, checkpointing is FSDP's own (fsdp_config), which avoids a redundant all-gather.
        activation_checkpointing=args.gradient_checkpointing and not args.fsdp,
        remove_unused_columns=False,
        **plan.runtime.training_kwargs(),
        **sharding.model_training_kwargs(plan.sharding, model, args.gradient_checkpointing),  # FSDP / DeepSpeed
    )
    # Length grouping reads the datasets' precomputed lengths instead of assembling every sample to measure it.
    trainer = samplers.with_dataset_lengths(ct.CompletionTrainer)(
        model=model,
        args=training_args,
        train_dataset=prepared.datasets["train"],
        eval_dataset=prepared.datasets["val"] if has_val else None,
        # One packed row per micro-batch, or dynamic padding (each batch to its longest sample, labels -100).
        data_collator=ct.make_data_collator(tokenizer, efficiency.packing, plan.runtime.pad_to_multiple_of),
        processing_class=tokenizer,
        optimizer_cls_and_kwargs=plan.precision.optimizer_cls_and_kwargs(args.learning_rate),
        callbacks=[EarlyStoppingCallback(args.early_stopping_patience)] if has_val else [],
        completion_only_logits=efficiency.completion_only_logits,
        lm_head_loss=plan.lm_head.kind,
        logits_chunk_rows=plan.lm_head.chunk_rows,
    )
    # Readable log lines (and one progress bar only in a terminal) instead of Trainer's printed dicts.
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(progress.progress_callback(progress.stderr_is_terminal()))
    trainer.add_callback(progress.epoch_end_log())
    return trainer


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
            base = ml.load_plain_model(source, local_only, dtype, args.trust_remote_code)
            folder = adapters.save_merged_model(
                args.output_dir, base,
                lambda model, out: sharding.save_plain_model(model, trainer.processing_class, out, args.save_format))
            logger.info("--merge_lora: merged model written to %s", folder)
        return
    if args.save_format == "bin":
        # transformers 5 only writes safetensors; the spec's pytorch_model.bin is re-written from what save_model
        # wrote (whole weights even when training was sharded), which from_pretrained still reads.
        sharding.full_weights_to_bin(args.output_dir)


def script_name() -> str:
    return sys.argv[0] if sys.argv[0].endswith(".py") else os.path.basename(__file__)


if __name__ == "__main__":
    sys.exit(main())
