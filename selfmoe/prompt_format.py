"""How an instruction becomes a prompt: the Alpaca template, or the model's own chat template.

``prompt_format`` (:data:`selfmoe.choices.PROMPT_FORMATS`):

- ``"alpaca"``: the Stanford Alpaca template (:data:`selfmoe.data.ALPACA_PROMPT_NO_INPUT`), what the
  paper trains its experts with; the response ends with the tokenizer's EOS.
- ``"chat"``: the tokenizer's chat template (``tokenizer.apply_chat_template``): the instruction (and
  its input, after a blank line) is one user message, followed by the generation prompt; the response
  is the assistant turn as the template renders it, ending with its end-of-turn token (SmolLM2's
  ``<|im_end|>``), so a model trained on it learns to stop.
- ``"auto"``: ``chat`` when the tokenizer has a chat template, else ``alpaca``.

Torch-free (strings only); :mod:`selfmoe.data` tokenises with it.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from .choices import PROMPT_FORMATS

__all__ = ["PROMPT_FORMATS", "check_prompt_format", "has_chat_template", "resolve_prompt_format", "user_content",
           "chat_prompt", "chat_target", "render_chat"]


def check_prompt_format(fmt: Any) -> str:
    if fmt not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format must be one of {list(PROMPT_FORMATS)}, got {fmt!r}")
    return fmt


def has_chat_template(tokenizer: Any) -> bool:
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def resolve_prompt_format(fmt: str, tokenizer: Any) -> str:
    """``"chat"`` or ``"alpaca"``: ``auto`` is ``chat`` iff the tokenizer has a chat template; ``chat``
    without one is a ``ValueError`` (nothing to render it with)."""
    check_prompt_format(fmt)
    if fmt == "auto":
        return "chat" if has_chat_template(tokenizer) else "alpaca"
    if fmt == "chat" and not has_chat_template(tokenizer):
        raise ValueError("prompt_format='chat' needs a tokenizer with a chat template (tokenizer.chat_template); "
                         "this one has none: use 'alpaca' (or 'auto')")
    return fmt


def user_content(instruction: str, input: str = "") -> str:
    """The user message of a record: the instruction, then its input after a blank line (when non-blank)."""
    return f"{instruction}\n\n{input}" if input and input.strip() else instruction


def render_chat(tokenizer: Any, messages: Sequence[Dict[str, str]], *, add_generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str")
    return text


def chat_prompt(tokenizer: Any, instruction: str, input: str = "") -> str:
    """The chat prompt of one instruction: one user message and the generation prompt."""
    return render_chat(tokenizer, [{"role": "user", "content": user_content(instruction, input)}],
                       add_generation_prompt=True)


def chat_target(tokenizer: Any, instruction: str, input: str, output: str) -> Optional[str]:
    """The text that follows :func:`chat_prompt` when the template renders the answered conversation:
    the assistant turn with its end-of-turn mark (and whatever the template puts after it). None when
    the full rendering does not start with the prompt's (a template that renders the last turn
    differently), so the caller falls back to the bare response."""
    messages: List[Dict[str, str]] = [{"role": "user", "content": user_content(instruction, input)}]
    prompt = render_chat(tokenizer, messages, add_generation_prompt=True)
    full = render_chat(tokenizer, messages + [{"role": "assistant", "content": output}], add_generation_prompt=False)
    if full.startswith(prompt) and len(full) > len(prompt):
        return full[len(prompt):]
    return None


def system_supported(tokenizer: Any) -> bool:
    """Whether the chat template renders a system message (some raise, some drop it silently)."""
    probe = "\x1fselfmoe-system-probe\x1f"
    try:
        text = render_chat(tokenizer, [{"role": "system", "content": probe}, {"role": "user", "content": "x"}],
                           add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - templates raise anything ("System role not supported")
        return False
    return probe in text


def with_system(tokenizer: Any, system: str, messages: List[Dict[str, str]]) -> List[Dict[str, str]]:
    """``messages`` headed by ``system``: a system message where the template renders one, else the
    system text prepended to the first user message."""
    system = system.strip()
    if not system:
        return list(messages)
    if system_supported(tokenizer):
        return [{"role": "system", "content": system}] + list(messages)
    out = [dict(m) for m in messages]
    for m in out:
        if m["role"] == "user":
            m["content"] = f"{system}\n\n{m['content']}"
            break
    return out
