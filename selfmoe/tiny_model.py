"""A tiny random Llama and a locally trained tokenizer, saved to a directory (no downloads).

Used by ``selfmoe demo --quick`` (the whole pipeline in seconds, on a model that knows nothing: the
numbers it gives are noise) and by the test suite (``tests/_tiny_lm.py`` imports it from here).
Torch and transformers load when a function runs, not at import.

The tokenizer is a small BPE over printable ASCII with a Metaspace pre-tokenizer: any ASCII text
encodes (unknown characters become ``<unk>``) and every id decodes to valid text, so the garbage a
random model writes is still well-formed strings for the parsers and filters to judge.
"""
from __future__ import annotations

import pathlib
import string
from typing import Any, Tuple

__all__ = ["build_tokenizer", "build_model", "save_tiny_lm", "load_tiny_lm"]

_CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\nWhat is 12 + 30?\n\n### Response:\nThe answer is 42.",
    "### Input:\nA list of numbers.\n\n### Response:\ndef add(a, b):\n    return a + b",
    "You are a math expert. Solve the problem step by step and give the final answer.",
    "Tom has 3 apples and buys 5 more. How many apples does Tom have now?",
    "Which planet is known as the red planet? (A) Venus (B) Mars (C) Jupiter (D) Saturn",
]


def build_tokenizer(bos: bool = True, pad: bool = True):
    """A fast tokenizer (vocab ~ 300). ``bos`` adds BOS via a post-processor; ``pad=False`` leaves no pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="never")
    alphabet = list(string.printable) + ["\u2581"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", tok.token_to_id("<s>"))])
    kwargs = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if pad:
        kwargs["pad_token"] = "<pad>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


def build_model(vocab_size: int, seed: int = 0, pad_token_id: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=2048,
                      pad_token_id=pad_token_id, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def save_tiny_lm(root: pathlib.Path, *, bos: bool = True, pad: bool = True, seed: int = 0) -> pathlib.Path:
    """Write model + tokenizer to ``root/tiny-llama`` and return that directory."""
    path = pathlib.Path(root) / "tiny-llama"
    tok = build_tokenizer(bos=bos, pad=pad)
    model = build_model(len(tok), seed=seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def load_tiny_lm(path: pathlib.Path) -> Tuple[Any, Any]:
    """Load from a local directory exactly as a user would (the "model path = directory" case)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    return model, tok

