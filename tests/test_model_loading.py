"""Tests for model_loading.py: which kind of output folder it is, where an adapter's base model comes from, and
that each kind loads to the model it should be (same logits as the model built directly)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from review_lm.inference import model_loading as ml
from review_lm.runs import run_folder as rf
from review_lm.utils import UsageError

EXAMPLE = str(Path(__file__).resolve().parent.parent / "example_movie_review_data.json")


def touch(folder: Path, *names: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_text("{}", encoding="utf-8")
    return folder


@pytest.mark.parametrize("files, kind", [
    (("config.json", "pytorch_model.bin"), rf.KIND_FULL),
    (("config.json", "model.safetensors"), rf.KIND_FULL),
    (("config.json", "model.safetensors.index.json"), rf.KIND_FULL),
    (("adapter_config.json", "adapter_model.safetensors", "tokenizer.json"), rf.KIND_ADAPTER),
    # A LoRA run with --merge_lora: the merged full model needs neither peft nor the base model.
    (("adapter_config.json", "adapter_model.safetensors", "config.json", "model.safetensors"), rf.KIND_FULL),
    (("config.json",), rf.KIND_FULL),  # weights missing: the loader gives its own reason
    (("tokenizer.json", "training_config.json"), None),
])
def test_model_dir_kind(tmp_path, files, kind):
    assert rf.model_kind(str(touch(tmp_path / "run", *files))) == kind


def test_check_model_dir_errors(tmp_path):
    with pytest.raises(UsageError, match="model folder not found"):
        ml.check_model_dir(str(tmp_path / "nope"))
    with pytest.raises(UsageError, match="not a folder"):
        ml.check_model_dir(str(touch(tmp_path, "file")) + "/file")
    with pytest.raises(UsageError, match=r"no config\.json, not a model folder \(nor a LoRA adapter folder"):
        ml.check_model_dir(str(touch(tmp_path / "empty")))


def test_base_model_source(tmp_path, monkeypatch):
    base = touch(tmp_path / "base")
    assert ml.base_model_source(str(base), {}) == (str(base), True)
    monkeypatch.chdir(tmp_path)
    assert ml.base_model_source("base", {}) == ("base", True)  # relative to where training ran
    assert ml.base_model_source("Qwen/Qwen2.5-3B", {}) == ("Qwen/Qwen2.5-3B", False)
    assert ml.base_model_source("Qwen/Qwen2.5-3B", {"HF_HUB_OFFLINE": "1"}) == ("Qwen/Qwen2.5-3B", True)
    for missing in ("/nowhere/base", "./gone", "~/gone-model-folder"):
        with pytest.raises(UsageError, match="is not a folder here .* pass --base_model PATH$"):
            ml.base_model_source(missing, {})


# --------------------------------------------------------------------------------------------------------------
# Loading real (tiny) models
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from review_lm.testing.tiny_model import make_tiny_model

    return Path(make_tiny_model(str(tmp_path_factory.mktemp("tiny")), tokenizer_kind="bpe", corpus=[EXAMPLE],
                                vocab_size=500))


@pytest.fixture(scope="module")
def adapter_dir(tiny, tmp_path_factory) -> Path:
    """A LoRA adapter saved by peft on the tiny model; non-zero B matrices, so it changes the logits."""
    import warnings

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # a deprecated attribute read inside get_peft_model
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny)),
                               LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                          init_lora_weights=False))
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(tiny)).save_pretrained(str(out))
    return out


def logits(model, tokenizer):
    import torch

    ids = tokenizer("电影《流浪地球》: 好看", return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        return model(**ids).logits


@pytest.mark.slow
def test_full_model_from_safetensors_and_from_bin_load_the_same(tiny, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    as_bin = Path(shutil.copytree(tiny, tmp_path / "bin"))
    state = AutoModelForCausalLM.from_pretrained(str(tiny)).state_dict()
    torch.save({k: v.contiguous() for k, v in state.items()}, as_bin / "pytorch_model.bin")  # as the trainer does
    (as_bin / "model.safetensors").unlink()
    a, b = ml.load_model_and_tokenizer(str(tiny)), ml.load_model_and_tokenizer(str(as_bin))
    assert (a.kind, a.device, a.dtype, a.base_model) == (rf.KIND_FULL, "cpu", "fp32", None)
    assert a.summary == "loaded full model (cpu, fp32)"
    assert a.tokenizer.padding_side == "left" and a.tokenizer.pad_token_id is not None
    assert torch.equal(logits(a.model, a.tokenizer), logits(b.model, b.tokenizer))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # raised inside peft
def test_adapter_dir_loads_base_plus_adapter(tiny, adapter_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny)
    loaded = ml.load_model_and_tokenizer(str(adapter_dir))
    assert loaded.kind == rf.KIND_ADAPTER and loaded.base_model == str(tiny)
    assert loaded.summary == f"loaded LoRA adapter on base model {tiny} (cpu, fp32)"
    expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny)), str(adapter_dir)).eval()
    base = AutoModelForCausalLM.from_pretrained(str(tiny)).eval()
    got = logits(loaded.model, loaded.tokenizer)
    assert torch.allclose(got, logits(expected, loaded.tokenizer), atol=1e-6)
    assert not torch.allclose(got, logits(base, loaded.tokenizer), atol=1e-3)  # the adapter is applied


@pytest.mark.slow
def test_adapter_with_a_moved_base_is_one_line_and_base_model_overrides(tiny, adapter_dir, tmp_path):
    moved = Path(shutil.copytree(adapter_dir, tmp_path / "moved"))
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "elsewhere" / "tiny")
    (moved / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError) as err:
        ml.load_model_and_tokenizer(str(moved))
    assert "\n" not in str(err.value) and str(err.value).endswith("pass --base_model PATH")
    assert ml.load_model_and_tokenizer(str(moved), base_model=str(tiny)).base_model == str(tiny)

    config["base_model_name_or_path"] = "no-such-org/no-such-model"  # a hub id, offline and not cached
    (moved / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError) as err:
        ml.load_model_and_tokenizer(str(moved), environ={"HF_HUB_OFFLINE": "1"})
    message = str(err.value)
    assert "\n" not in message and "cannot load the adapter's base model 'no-such-org/no-such-model'" in message


@pytest.mark.slow
def test_adapter_on_the_wrong_base_is_one_line(adapter_dir, tmp_path):
    from review_lm.testing.tiny_model import make_tiny_model

    other = make_tiny_model(str(tmp_path / "other"), tokenizer_kind="bpe", corpus=[EXAMPLE], vocab_size=500,
                            hidden_size=32)
    with pytest.raises(UsageError) as err:
        ml.load_model_and_tokenizer(str(adapter_dir), base_model=other)
    assert "\n" not in str(err.value) and "cannot apply the LoRA adapter to its base model" in str(err.value)


@pytest.mark.slow
def test_evaluation_runs_on_an_adapter_dir(adapter_dir, tmp_path, capsys):
    import evaluate_movie_review as ev

    run = Path(shutil.copytree(adapter_dir, tmp_path / "lora_run"))
    (run / "test_samples.json").write_text(json.dumps(
        [{"prompt": "请为电影《流浪地球》写一条影评：\n", "reference": "好看", "earlier_reviews": ["boring"]}],
        ensure_ascii=False), encoding="utf-8")
    assert ev.main(["--model_dir", str(run), "--max_new_tokens", "3", "--no_progress"]) == 0
    assert "loaded LoRA adapter on base model" in capsys.readouterr().err
    assert json.loads((run / "eval" / "metrics.json").read_text(encoding="utf-8"))["generation"]["device"] == "cpu"


def test_hub_probe_uses_the_endpoints_own_port_or_its_schemes():
    assert ml.hub_port("https://huggingface.co") == 443
    assert ml.hub_port("http://mirror.local") == 80  # was probed on 443, so a plain-http mirror looked offline
    assert ml.hub_port("http://mirror.local:8080/hf") == 8080


def test_one_line_never_fails_on_an_empty_message():
    assert ml.one_line(OSError()) == "OSError"  # str(err).splitlines()[0] raised IndexError here
    assert ml.one_line(ValueError("first\n  second")) == "first second"
