"""The tiny random Llama + tokenizer of the tests: one copy, in :mod:`selfmoe.tiny_model`; and its sharpened variant."""
from selfmoe.tiny_model import build_model, build_tokenizer, load_tiny_lm, save_tiny_lm  # noqa: F401

__all__ = ["build_model", "build_tokenizer", "load_tiny_lm", "save_tiny_lm", "sharp_tiny_lm"]


def sharp_tiny_lm(folder):
    """The tiny random Llama saved under ``folder`` with its attention sharpened (q and k weights x 8).

    At the default init its attention is nearly uniform, so its greedy tokens barely depend on positions
    or on which cached columns a row sees: a misplaced position or cache column would go unnoticed.
    """
    import torch

    model, tok = load_tiny_lm(save_tiny_lm(folder))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
    return model, tok
