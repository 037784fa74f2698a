"""Training precision: which dtype the weights live in, which dtype the maths runs in, and which optimizer.

Why this is its own decision: bf16 keeps 8 significant bits. For a weight of magnitude 0.02 one step of the bf16
grid is ~1.2e-4, while an AdamW update is at most about the learning rate (the spec's default is 1e-5). Updates
smaller than half a grid step round away, so "pure bf16" training (bf16 weights updated in place by plain AdamW)
leaves most weights frozen at fine-tuning learning rates: measured with a random Qwen2 (tests/test_precision.py),
3 AdamW steps at lr 1e-5 change ~15% of the decoder weights in bf16 and ~100% in fp32.

The modes (``--precision``):

* ``bf16-mixed`` (auto on a bf16 GPU): fp32 master weights, gradients and AdamW states; bf16 autocast for the
  maths (FlashAttention 2 still runs: under autocast its inputs are bf16). 16 bytes/parameter + activations.
  With LoRA the frozen base stays in bf16 and only the adapters are fp32 (peft's ``autocast_adapter_dtype``).
* ``bf16-pure``: bf16 weights, gradients and optimizer states, for memory. Only with a compensated optimizer:
  torch-optimi's AdamW with Kahan summation, which keeps the rounding error of every update in a bf16
  compensation buffer and adds it back, so small updates accumulate instead of vanishing. ~10 bytes/parameter.
  We chose torch-optimi over torchao's stochastic-rounding AdamW because it is plain PyTorch (no torch.compile, runs
  on CPU and GPU alike, so the tests exercise the real optimizer) and because Kahan summation is deterministic and
  tracks fp32 training more closely than stochastic rounding's unbiased-but-noisy updates.
* ``fp16-mixed`` (auto on a GPU without bf16): fp32 weights, fp16 autocast with a gradient scaler (Trainer's).
* ``fp32``: everything in fp32 (auto on CPU).

:func:`plan_precision` is a pure function: it takes the hardware facts and the flags and returns a
:class:`PrecisionPlan` or raises :class:`review_lm.utils.UsageError` (one line) for a combination that cannot work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from review_lm.utils import UsageError, importable, short_dtype_name, torch_dtype_name

PRECISIONS = ("auto", "bf16-mixed", "bf16-pure", "fp16-mixed", "fp32")
ADAMW_TORCH = "adamw_torch"
ADAMW_KAHAN = "optimi_adamw_kahan"
OPTIMI_INSTALL = "pip install torch-optimi"


@dataclass(frozen=True)
class PrecisionPlan:
    mode: str  # bf16-mixed | bf16-pure | fp16-mixed | fp32
    weights_dtype: str  # torch dtype name the model is loaded in (for LoRA: the frozen base)
    autocast: str | None  # "bf16" | "fp16" | None: Trainer's mixed-precision autocast
    optimizer: str  # ADAMW_TORCH | ADAMW_KAHAN
    reason: str
    optimizer_reason: str

    @property
    def compute_dtype(self) -> str:
        """The dtype matrix maths (and attention) runs in: the autocast dtype, else the weights' own."""
        return self.autocast or short_dtype_name(self.weights_dtype)

    @property
    def torch_compute_dtype(self) -> str:
        """:attr:`compute_dtype` as a torch dtype name (what bitsandbytes de-quantizes QLoRA weights to)."""
        return torch_dtype_name(self.compute_dtype)

    def training_kwargs(self) -> dict[str, Any]:
        return {"bf16": self.autocast == "bf16", "fp16": self.autocast == "fp16"}

    def optimizer_cls_and_kwargs(self, learning_rate: float, weight_decay: float = 0.0):
        """``Trainer(optimizer_cls_and_kwargs=...)`` for the compensated optimizer; None: Trainer's AdamW."""
        if self.optimizer != ADAMW_KAHAN:
            return None
        import optimi

        # Same hyper-parameters as Trainer's torch AdamW (betas, eps, decoupled weight decay scaled by the lr),
        # so the only difference between bf16-pure and bf16-mixed is where the rounding error goes.
        return optimi.AdamW, {"lr": learning_rate, "betas": (0.9, 0.999), "eps": 1e-8,
                              "weight_decay": weight_decay, "kahan_sum": True}


def plan_precision(requested: str, cuda_available: bool, bf16_supported: bool, finetuning_type: str = "full",
                   optimi_available: bool = True, quantization_bit: int | None = None,
                   deepspeed: bool = False) -> PrecisionPlan:
    """Decide the precision of a run. ``bf16_supported`` is the GPU's (ignored without CUDA: bf16 runs on CPUs)."""
    lora = finetuning_type == "lora"
    mode = requested
    if mode == "auto":
        mode = ("bf16-mixed" if bf16_supported else "fp16-mixed") if cuda_available else "fp32"
    gpu_bf16 = bf16_supported or not cuda_available  # CPUs compute bf16 (slowly) in software
    if mode in ("bf16-mixed", "bf16-pure") and not gpu_bf16:
        raise UsageError(f"--precision {mode}: this GPU does not support bf16; use --precision fp16-mixed or fp32")
    if mode == "fp16-mixed" and not cuda_available:
        raise UsageError("--precision fp16-mixed needs a CUDA GPU (fp16 autocast with a gradient scaler); "
                         "on CPU use fp32 or bf16-mixed")
    if quantization_bit and mode in ("fp32", "bf16-pure"):
        raise UsageError(f"--quantization_bit {quantization_bit} computes in bf16/fp16 on top of frozen 4-bit "
                         f"weights: use --precision auto, bf16-mixed or fp16-mixed, not {mode}")
    if mode == "bf16-pure":
        if deepspeed:
            raise UsageError("--precision bf16-pure with --deepspeed: DeepSpeed's bf16 mode keeps its own fp32 "
                             "master weights in the optimizer; use --precision auto or bf16-mixed")
        if lora:
            raise UsageError("--precision bf16-pure is for full fine-tuning: LoRA already keeps the frozen base in "
                             "bf16 and trains small fp32 adapters; use --precision auto or bf16-mixed")
        if not optimi_available:
            raise UsageError(f"--precision bf16-pure needs torch-optimi for its Kahan-compensated AdamW "
                             f"({OPTIMI_INSTALL}); plain AdamW on bf16 weights loses most fine-tuning updates")
        return PrecisionPlan(
            mode, torch_dtype_name("bf16"), "bf16", ADAMW_KAHAN,
            "bf16 weights, gradients and optimizer states (memory-lean); bf16 autocast",
            "torch-optimi AdamW with Kahan summation: bf16 rounding errors are carried over, not lost")
    adamw = "torch AdamW on fp32 weights"
    if mode == "fp32":
        return PrecisionPlan(mode, torch_dtype_name("fp32"), None, ADAMW_TORCH,
                             "no CUDA GPU: fp32" if requested == "auto" else "fp32 requested", adamw)
    half = "bf16" if mode == "bf16-mixed" else "fp16"
    origin = "auto: " if requested == "auto" else ""
    if lora:
        return PrecisionPlan(mode, torch_dtype_name(half), half, ADAMW_TORCH,
                             f"{origin}frozen base in {half}, LoRA adapters and their AdamW states in fp32, "
                             f"{half} autocast", "torch AdamW on the fp32 adapters")
    scaler = " with a gradient scaler" if half == "fp16" else ""
    return PrecisionPlan(mode, torch_dtype_name("fp32"), half, ADAMW_TORCH,
                         f"{origin}fp32 master weights, gradients and AdamW states; {half} autocast{scaler}", adamw)


def optimi_importable() -> bool:
    """torch-optimi (pure PyTorch) installed."""
    return importable("optimi")
