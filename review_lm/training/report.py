"""What a training run says about itself: the start summary, the outcome, the end summary and the loss curve.

Everything here reads the plan (``plan.RunPlan``), the model facts and Trainer's log history; nothing decides.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

from review_lm.data import report as data_report
from review_lm.data.reviews import ReviewData, Sample
from review_lm.runs import run_folder
from review_lm.training import lm_head_plan
from review_lm.training.plan import RunPlan
from review_lm.utils import pyplot, write_atomic

logger = logging.getLogger("movie_review")


# --------------------------------------------------------------------------------------------------------------
# Start
# --------------------------------------------------------------------------------------------------------------
def data_source(data: ReviewData) -> str:
    """The input as given, plus how many files it expanded to when that is not obvious."""
    files = len(data.files)
    return data.path if files <= 1 or data.path == ", ".join(data.files) else f"{data.path} ({files} files)"


def start_summary(args, data: ReviewData, splits: dict[str, list[Sample]], plan: RunPlan,
                  model_facts: dict[str, Any], data_facts: dict[str, Any] | None = None) -> str:
    """The start summary's lines, from the plan, the model facts and the data facts (format, one epoch)."""
    facts = {**plan.record(), **model_facts}
    data_facts = data_facts or {}
    summary = data_report.split_summary(splits)
    rows = [
        f"data        {data_source(data)}: {len(data.users)} user(s), "
        f"{data.num_reviews} reviews",
        *(f"  {n:<5}     {i['samples']:>5} samples  "
          f"{i['time_range'][0] + ' ~ ' + i['time_range'][1] if i['time_range'] else '-'}"
          for n, i in summary.items()),
        f"prompt      profile={'on' if args.use_profile else 'off'} history={'on' if args.use_history else 'off'}"
        f" max_length={args.max_length}",
        *format_summary_rows(data_facts),
        f"model       {args.model_path}  ({facts['device']}, weights {facts['dtype']})",
        f"precision   {facts['precision']}: {facts['precision_reason']}",
        f"optimizer   {facts['optimizer']}: {facts['optimizer_reason']}",
        f"attention   {facts['attention']}: {facts['attention_reason']}",
        f"packing     {'on' if facts['packing'] else 'off'}: {facts['packing_reason']}",
        f"logits      {'labelled positions only' if facts['completion_only_logits'] else 'every position'}: "
        f"{facts['completion_only_logits_reason']}",
        *lm_head_plan.summary_rows(facts),
        *scaling_summary_rows(facts),
        f"processes   world size {facts['world_size']}; effective batch {args.batch_size} x "
        f"{args.gradient_accumulation_steps} x {facts['world_size']} = {facts['effective_batch_size']}",
        f"steps       {facts['optimizer_steps_per_epoch']} optimizer steps/epoch, up to {args.max_epochs} epochs "
        f"({facts['max_optimizer_steps']} steps), warmup {args.warmup_steps}",
        f"output      {args.output_dir}",
    ]
    if plan.report_message:
        rows.append(f"tracking    {plan.report_message}")
    return "training setup\n" + "\n".join("  " + r for r in rows)


def format_summary_rows(facts: dict[str, Any]) -> list[str]:
    """Start-summary rows for the prompt format, the chat template and what one epoch costs."""
    if not facts:
        return []
    template = facts.get("chat_template", "none")
    source = facts.get("chat_template_source")
    if source and template != "none":
        template = source if source.startswith(template) else f"{template} ({source})"
    unit = "windows" if facts.get("prompt_format") == "conversation" else "samples"
    epoch = facts["epoch"]
    return [
        f"format      {facts.get('prompt_format', 'spec')}; chat template {template}",
        f"epoch       {epoch['train_sequences']} training sequences ({unit}), {epoch['train_reviews']} reviews, "
        f"{epoch['tokens_per_epoch']:,} tokens ({epoch['labelled_tokens_per_epoch']:,} labelled); "
        f"{epoch['optimizer_steps_per_epoch']} optimizer steps, ~{epoch['reviews_per_optimizer_step']:g} reviews "
        "per optimizer step",
    ]


def start_warnings(args, plan: RunPlan, prepared) -> list[str]:
    """What the user should know before a long run starts."""
    warnings = []
    if not plan.has_val:
        warnings.append(f"the validation split is empty: training all {args.max_epochs} epochs without early "
                        "stopping")
    if args.warmup_steps >= plan.max_steps:
        warnings.append(f"--warmup_steps {args.warmup_steps} >= the {plan.max_steps} optimizer steps of the whole "
                        f"run ({plan.steps_per_epoch} per epoch): the learning rate never reaches "
                        f"{args.learning_rate:g}. Consider --warmup_steps {max(1, plan.max_steps // 10)}.")
    if prepared.truncated_targets:
        warnings.append(f"{prepared.truncated_targets} target reviews were longer than --max_length and were "
                        "truncated")
    if prepared.data is not None:  # the data's own oddities, as the loader's report lists them
        warnings += data_report.data_warnings(prepared.data, args.max_length)
    if prepared.text_mismatches:
        warnings.append(f"with this tokenizer {prepared.text_mismatches} of the first {prepared.text_checked} "
                        "training prompts tokenize differently as text than as assembled pieces; evaluation "
                        "generates from the prompt text")
    return warnings


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



# --------------------------------------------------------------------------------------------------------------
# End
# --------------------------------------------------------------------------------------------------------------
def epoch_losses(log_history: list[dict[str, Any]]) -> tuple[dict[int, float], dict[int, float]]:
    """Train and eval loss per (rounded) epoch from Trainer's log history.

    Each logged training loss is the mean over the optimizer steps since the previous log, and the loss is also
    logged at every epoch's end (``progress.EpochEndLog``), so an epoch's windows add up to exactly its steps: the
    epoch's training loss is their step-weighted mean (= the mean over the epoch's steps, as a per-epoch log
    gives it). For evaluation the last value of an epoch wins.
    """
    sums: dict[int, float] = {}
    steps: dict[int, int] = {}
    evaluation: dict[int, float] = {}
    last_step = 0
    for entry in log_history:
        if "epoch" not in entry:
            continue
        epoch = max(1, math.ceil(entry["epoch"] - 1e-6))
        if "loss" in entry:
            step = entry.get("step", last_step + 1)
            window = max(1, step - last_step)
            sums[epoch] = sums.get(epoch, 0.0) + entry["loss"] * window
            steps[epoch] = steps.get(epoch, 0) + window
            last_step = step
        if "eval_loss" in entry:
            evaluation[epoch] = entry["eval_loss"]
    return {e: sums[e] / steps[e] for e in sums}, evaluation


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


def summarize_run(args, trainer, result, has_val: bool) -> dict[str, Any]:
    history = trainer.state.log_history
    train_losses, eval_losses = epoch_losses(history)
    evaluations = loss_points(history, "eval_loss")
    # The best evaluation overall: with --eval_steps an epoch's last evaluation need not be its best one.
    best_step, best_at, best_loss = min(evaluations, key=lambda p: (p[2], p[0])) if evaluations else (None, 0, None)
    best = max(1, math.ceil(best_at - 1e-6)) if evaluations else None
    plot_loss_curve(run_folder.path(args.output_dir, run_folder.LOSS_CURVE), history,
                    f"{os.path.basename(os.path.normpath(args.output_dir))}: loss per epoch")
    # Epochs begun: early stopping after an --eval_steps evaluation may end a run mid-epoch.
    epochs_run = max(1, math.ceil(trainer.state.epoch - 1e-6)) if trainer.state.epoch else 0
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


def log_end_summary(args, outcome: dict[str, Any]) -> None:
    where = f"step {outcome['best_step']}" if outcome.get("best_step") else f"epoch {outcome['best_epoch']}"
    best = (f"best {where} (val loss {outcome['best_eval_loss']:.4f})"
            if outcome["best_epoch"] else "no validation split: final epoch saved")
    stop = "stopped early" if outcome["stopped_early"] else "ran all epochs"
    logger.info("training done: %d epoch(s), %s; %s\n  model and run files: %s\n  loss curve: %s",
                outcome["epochs_run"], stop, best, os.path.abspath(args.output_dir),
                run_folder.path(args.output_dir, run_folder.LOSS_CURVE))
