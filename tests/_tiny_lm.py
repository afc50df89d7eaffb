"""The tiny random Llama + tokenizer of the tests: one copy, in :mod:`selfmoe.tiny_model`."""
from selfmoe.tiny_model import build_model, build_tokenizer, load_tiny_lm, save_tiny_lm  # noqa: F401

__all__ = ["build_model", "build_tokenizer", "load_tiny_lm", "save_tiny_lm"]
