"""Where models come from and how they load: the model-source resolver of training, and the one loader
of trained output folders behind evaluation and generation.

The trainer writes one of two kinds of model into its output directory:

* a **full model**: ``config.json`` + ``pytorch_model.bin`` or ``model.safetensors`` (or a sharded index), the
  tokenizer files beside them. A LoRA run with ``--merge_lora`` writes its merged model this way, into the
  run's ``merged/`` folder. A folder holding full weights and an adapter is read as the full model (it needs
  neither peft nor the base model).
* a **LoRA adapter**: ``adapter_config.json`` + ``adapter_model.safetensors`` (peft's ``save_pretrained``) and
  the tokenizer files. ``adapter_config.json`` names the base model (``base_model_name_or_path``, as the user
  passed it to the trainer): a local folder (a relative path is taken from the current directory, where training
  is normally run) or a hub id, read from the local Hugging Face cache first and from the hub only when that
  is allowed (``HF_HUB_OFFLINE`` unset). The adapter is applied with peft, imported on this path only.

    loaded = load_model_and_tokenizer("outputs/movie_review_model_Y")
    loaded.model, loaded.tokenizer, loaded.device, loaded.dtype, loaded.kind, loaded.summary

Device and dtype: the GPU in bf16 when there is one (fp32 on a GPU without bf16), the CPU in fp32
(:func:`resolve_device_dtype`). Weights are read with safe loaders only (safetensors, or ``torch.load`` with
``weights_only=True`` as transformers 5 and peft do for ``.bin``); custom model code runs only with
``trust_remote_code=True``. Every failure is a :class:`review_lm.utils.UsageError` with a one-line message.

torch / transformers / peft are imported inside the functions, so checking a folder costs nothing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from review_lm.runs.run_folder import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CONFIG,
    KIND_ADAPTER,
    has_tokenizer_files,
    model_kind,
    read_json,
)
from review_lm.utils import UsageError, torch_dtype_name

logger = logging.getLogger("movie_review")
HUB_ENDPOINT = "https://huggingface.co"


# --------------------------------------------------------------------------------------------------------------
# Model source: a local folder or a hub id (training's --model_path, an adapter's base model)
# --------------------------------------------------------------------------------------------------------------
def hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """Can we open a connection to the model hub? Answers in seconds instead of a minute of retries."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(endpoint)
    try:
        with socket.create_connection((url.hostname or "", hub_port(endpoint)), timeout=timeout):
            return True
    except OSError:
        return False


def hub_port(endpoint: str) -> int:
    """The port an endpoint URL connects to: its own, else the scheme's (http 80, https 443)."""
    from urllib.parse import urlparse

    url = urlparse(endpoint)
    return url.port or (80 if url.scheme == "http" else 443)


def hub_offline(environ: Mapping[str, str]) -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it."""
    return environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def looks_like_path(name: str) -> bool:
    return os.path.isabs(name) or name.startswith((".", "~")) or os.path.exists(os.path.expanduser(name))


def resolve_model_source(name: str, environ: Mapping[str, str], missing: str,
                         probe_hub: bool = True) -> tuple[str, bool]:
    """Return (path or hub id, local_files_only) for a model named by the user.

    A path that exists is a local folder. Something that looks like a path (absolute, ./, ../, ~) but is no
    folder is a one-line error, ``missing``. Anything else is a hub id, read from the local Hugging Face cache
    only when HF_HUB_OFFLINE is set or (``probe_hub``) the hub cannot be reached; behind a proxy a direct
    connection proves nothing, so the decision is left to huggingface_hub then.
    """
    path = os.path.expanduser(name)
    if looks_like_path(name):
        if not os.path.isdir(path):
            raise UsageError(missing)
        return path, True
    offline = hub_offline(environ)
    proxied = any(environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))
    if probe_hub and not offline and not proxied and not hub_reachable(environ.get("HF_ENDPOINT", HUB_ENDPOINT)):
        logger.warning("model hub unreachable: looking for %s in the local Hugging Face cache only", name)
        offline = True
    return path, offline


def pretrained_source_kwargs(local_only: bool) -> dict[str, Any]:
    """The ``from_pretrained`` keyword arguments that say where weights may come from.

    ``adapter_kwargs``: transformers 5.24 looks for an adapter_config.json on the hub for any hub id without
    passing local_files_only on, which costs ~30 s of retries with the hub unreachable.
    """
    return {"local_files_only": local_only, "adapter_kwargs": {"local_files_only": local_only}}


def load_plain_model(source: str, local_only: bool, dtype: str, trust_remote_code: bool):
    """A model as saved (``dtype``: a torch dtype name), on the CPU, nothing added: e.g. the base a LoRA adapter
    is merged into (``adapters.save_merged_model``)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, dtype),
                                                trust_remote_code=trust_remote_code,
                                                **pretrained_source_kwargs(local_only))


# --------------------------------------------------------------------------------------------------------------
# Trained output folders
# --------------------------------------------------------------------------------------------------------------


def resolve_device_dtype(device: str, dtype: str, cuda_available: bool, bf16_supported: bool) -> tuple[str, str]:
    """``auto``: the GPU when there is one, in bf16 where it is supported (fp32 otherwise: fp16 can overflow
    in Qwen's activations); the CPU in fp32."""
    if device == "auto":
        device = "cuda" if cuda_available else "cpu"
    if dtype == "auto":
        dtype = "bf16" if device.startswith("cuda") and bf16_supported else "fp32"
    return device, dtype


def check_model_dir(model_dir: str) -> str:
    """One-line errors for a folder that cannot hold a model; returns its kind."""
    if not os.path.exists(model_dir):
        raise UsageError(f"{model_dir}: model folder not found")
    if not os.path.isdir(model_dir):
        raise UsageError(f"{model_dir}: not a folder")
    kind = model_kind(model_dir)
    if kind is None:
        raise UsageError(f"{model_dir}: no config.json, not a model folder (nor a LoRA adapter folder: no "
                         f"{ADAPTER_CONFIG}; has training finished?)")
    return kind


def adapter_base_model(model_dir: str) -> str:
    """``base_model_name_or_path`` from the adapter's config (one-line error when it is unreadable or absent)."""
    path = os.path.join(model_dir, ADAPTER_CONFIG)
    try:
        config = read_json(path)  # the shared reader: no traceback for a hand-edited, hostile file
    except UsageError as err:
        raise UsageError(f"cannot read the adapter config: {err}") from None
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if not isinstance(base, str) or not base.strip():
        raise UsageError(f"{path}: no base_model_name_or_path, so the base model is unknown; pass --base_model PATH")
    return base


# What makes two models the same architecture, read from config.json without loading weights. An adapter applied
# to a base that differs in any of these fails with shape errors, or worse, loads and writes nonsense.
ARCHITECTURE_KEYS = ("architectures", "model_type", "hidden_size", "num_hidden_layers", "intermediate_size",
                     "num_attention_heads", "num_key_value_heads", "vocab_size")


def config_differences(recorded: Mapping[str, Any], given: Mapping[str, Any]) -> list[str]:
    """``hidden_size 64 -> 128``, one phrase per architecture fact that differs between two config.json. Pure."""
    return [f"{key} {recorded.get(key)!r} -> {given.get(key)!r}" for key in ARCHITECTURE_KEYS
            if recorded.get(key) != given.get(key)]


def _local_config(model: str) -> dict[str, Any] | None:
    """A model's config.json, read without loading anything: from its folder, or for a hub id from the local
    Hugging Face cache (never the network). None when there is no readable one here."""
    path = os.path.join(os.path.expanduser(model), CONFIG)
    if not os.path.isfile(path) and not looks_like_path(model):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model, CONFIG)
        except Exception:  # noqa: BLE001 - a malformed id or an unreadable cache: nothing to compare against
            cached = None
        path = cached if isinstance(cached, str) else path
    if not os.path.isfile(path):
        return None
    try:
        config = read_json(path)
    except UsageError:
        return None
    return config if isinstance(config, dict) else None


_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")
_HIDDEN_INPUT_RE = re.compile(r"\.(q_proj|k_proj|v_proj|gate_proj|up_proj)\.lora_A(\.default)?\.weight$")
_MAX_HEADER = 100 << 20  # a safetensors header is a few KB per tensor; more is not a header


def adapter_weight_facts(model_dir: str) -> dict[str, int]:
    """What the adapter's own weights say about its base, from the safetensors header only (no tensor read):
    ``hidden_size`` (the input width of a q/k/v/gate/up projection's lora_A) and ``layers`` (highest layer + 1)."""
    path = os.path.join(model_dir, ADAPTER_WEIGHTS)
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size)) if 0 < size <= _MAX_HEADER else {}
    except (OSError, ValueError, RecursionError):
        return {}
    facts: dict[str, int] = {}
    for name, info in (header.items() if isinstance(header, dict) else ()):
        shape = info.get("shape") if isinstance(info, dict) else None
        if (layer := _LAYER_RE.search(name)) is not None:
            facts["layers"] = max(facts.get("layers", 0), int(layer.group(1)) + 1)
        if _HIDDEN_INPUT_RE.search(name) and isinstance(shape, list) and len(shape) == 2:
            facts["hidden_size"] = shape[1]
    return facts


def weight_mismatches(facts: Mapping[str, int], config: Mapping[str, Any]) -> list[str]:
    """Where the adapter's weights cannot fit a base of ``config``, one phrase each. Pure."""
    out = []
    if "hidden_size" in facts and config.get("hidden_size") not in (None, facts["hidden_size"]):
        out.append(f"its LoRA weights take hidden_size {facts['hidden_size']}, the model has "
                   f"{config.get('hidden_size')}")
    layers = config.get("num_hidden_layers")
    if "layers" in facts and isinstance(layers, int) and facts["layers"] > layers:
        out.append(f"its LoRA weights reach layer {facts['layers'] - 1}, the model has {layers} layers")
    return out


def check_base_model(model_dir: str, base_model: str | None) -> str | None:
    """``--base_model`` for a LoRA run, checked before anything loads: refused (one line) when its config.json
    differs in architecture from the recorded base's (a folder, or a hub id in the local cache) or, when the
    recorded base is not here, from what the adapter's weight shapes need; a note (returned) when it is the same
    architecture at another path. None when there is nothing to say: a full model, no --base_model, the recorded
    base itself, or a --base_model whose config cannot be read here (the loader speaks for it then)."""
    if not base_model or model_kind(model_dir) != KIND_ADAPTER:
        return None
    recorded = adapter_base_model(model_dir)
    if os.path.realpath(recorded) == os.path.realpath(base_model) or recorded == base_model:
        return None
    recorded_config, given_config = _local_config(recorded), _local_config(base_model)
    if given_config is None:
        return None
    weights = weight_mismatches(adapter_weight_facts(model_dir), given_config)
    differences = (config_differences(recorded_config, given_config) if recorded_config else []) or weights
    if differences:
        raise UsageError(f"--base_model {base_model} is not the model the adapter in {model_dir} was trained on "
                         f"({recorded}): {'; '.join(differences)}; pass that model (or one of the same architecture)")
    if recorded_config is None:  # the recorded base is not here to compare with: the weights said all they can
        return (f"--base_model {base_model} replaces the adapter's recorded base {recorded}, which is not here to "
                "compare with; the adapter's weight shapes fit it")
    return (f"--base_model {base_model} replaces the adapter's recorded base {recorded} (same architecture: "
            f"{given_config.get('model_type')}, hidden_size {given_config.get('hidden_size')}, vocab_size "
            f"{given_config.get('vocab_size')})")


def base_model_source(base: str, environ: Mapping[str, str]) -> tuple[str, bool]:
    """Where to read an adapter's base model from: :func:`resolve_model_source` with the adapter's words."""
    return resolve_model_source(base, environ, f"base model {base!r} (from {ADAPTER_CONFIG}) is not a folder here "
                                "(training ran elsewhere or it moved); pass --base_model PATH", probe_hub=False)


def one_line(err: BaseException, limit: int = 300) -> str:
    """transformers' and peft's messages span several lines; the contract is one line, so fold and shorten."""
    reason = " ".join(str(err).split()) or type(err).__name__
    return reason if len(reason) <= limit else reason[:limit - 3] + "..."


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel, or a peft PeftModel wrapping one (kind == KIND_ADAPTER)
    tokenizer: Any
    device: str
    dtype: str  # bf16 | fp16 | fp32
    kind: str  # KIND_FULL | KIND_ADAPTER
    base_model: str | None  # the adapter's base model; None for a full model

    @property
    def summary(self) -> str:
        """One line saying what was loaded, for the user."""
        if self.kind == KIND_ADAPTER:
            what = f"LoRA adapter on base model {self.base_model}"
        else:
            what = "full model"
        return f"loaded {what} ({self.device}, {self.dtype})"


def load_model_and_tokenizer(model_dir: str, device: str = "auto", dtype: str = "auto",
                             trust_remote_code: bool = False, base_model: str | None = None,
                             environ: dict[str, str] | None = None) -> LoadedModel:
    """Load the model and tokenizer of a trained output directory (either kind), ready for ``generate``.

    ``base_model`` overrides the adapter's recorded base (e.g. the folder moved since training). The tokenizer
    is padded on the left (decoder-only batches must end where generation starts); a missing pad token becomes
    EOS, as in Qwen2.5 base.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kind = check_model_dir(model_dir)
    cuda = torch.cuda.is_available()
    device, dtype = resolve_device_dtype(device, dtype, cuda, cuda and torch.cuda.is_bf16_supported())
    if device.startswith("cuda") and not cuda:
        raise UsageError(f"--device {device}: no CUDA GPU is available here")
    torch_dtype = getattr(torch, torch_dtype_name(dtype))

    base = None
    source, local_only = model_dir, True
    if kind == KIND_ADAPTER:
        base = base_model or adapter_base_model(model_dir)
        source, local_only = base_model_source(base, os.environ if environ is None else environ)
    try:
        # The trainer saves the tokenizer with the adapter; fall back to the base model's for a bare adapter.
        tokenizer_source = model_dir if has_tokenizer_files(model_dir) else source
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, trust_remote_code=trust_remote_code,
                                                  local_files_only=local_only or tokenizer_source == model_dir)
        # safetensors first; a .bin is read with torch.load(weights_only=True) by transformers 5.
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, trust_remote_code=trust_remote_code,
                                                     **pretrained_source_kwargs(local_only))
    except (OSError, ValueError, KeyError) as err:
        if kind == KIND_ADAPTER:
            raise UsageError(f"{model_dir}: cannot load the adapter's base model {base!r}: {one_line(err)}; pass "
                             "--base_model PATH") from None
        raise UsageError(f"{model_dir}: cannot load the model/tokenizer: {one_line(err)}") from None
    if kind == KIND_ADAPTER:
        model = apply_adapter(model, model_dir)
    if tokenizer.eos_token_id is None:
        raise UsageError(f"{model_dir}: the tokenizer has no EOS token, so generation could never stop")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # Qwen2.5 base does the same (pad == eos)
    model.to(device).eval()
    return LoadedModel(model, tokenizer, device, dtype, kind, base)


def apply_adapter(model, model_dir: str):
    """The base model with the LoRA adapter of ``model_dir`` applied (peft, inference mode)."""
    try:
        from peft import PeftModel
    except ImportError:
        raise UsageError(f"{model_dir} holds a LoRA adapter, which needs the peft package (pip install peft)") \
            from None
    try:
        with warnings.catch_warnings():
            # peft asks the model for a deprecated attribute: the warning is the libraries', not the user's.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return PeftModel.from_pretrained(model, model_dir, is_trainable=False)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        # RuntimeError: shape mismatches when the adapter was trained on another base model.
        raise UsageError(f"{model_dir}: cannot apply the LoRA adapter to its base model: {one_line(err)}") from None
