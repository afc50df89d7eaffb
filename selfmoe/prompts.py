"""Domain prompt templates for self-specialization, and the few-shot prompts built from them.

Each domain has two texts:

- ``brainstorm``: the header of the instruction-writing prompt. The base model reads it, then a few
  seed instructions, then an open ``### Instruction:`` slot that it fills with a new one.
- ``system``: the domain "expert" system prompt that heads the response prompt ("You are a math
  expert..."), followed by seed instruction/response pairs and the new instruction.

The four built-in domains follow the paper's choice of target tasks (knowledge: multiple-choice
questions; reasoning: multi-step reasoning problems; math: solvable word problems; coding: Python
functions with tests); the wording is ours. Override any of them, or add domains, with a dict or a
JSON file of the same shape (:func:`load_templates`). A domain without a template gets a generic one
with its name filled in. Templates are plain text: ``{domain}`` is the only placeholder, replaced
literally, so braces in a template (code!) are safe.

Prompt formats (``fmt``, see :mod:`selfmoe.prompt_format`): ``"alpaca"`` (default) builds the few-shot
continuation texts above; ``"chat"`` renders the same content with the tokenizer's chat template: the
brainstorm header, the seed instructions as a numbered list and a request for one new instruction in
one user message; the response prompt as the system prompt (a system message where the template
renders one, else the head of the first user message), the seed pairs as earlier user/assistant turns
and the new instruction as the last user turn. Both end in the generation prompt; the model's turn
ends at its end-of-turn token.
"""
from __future__ import annotations

import json
import os
import pathlib
from dataclasses import dataclass, fields
from typing import Any, Dict, Mapping, Optional, Sequence, Union

__all__ = [
    "DomainTemplate",
    "DEFAULT_TEMPLATES",
    "GENERIC_TEMPLATE",
    "INSTRUCTION_MARK",
    "RESPONSE_MARK",
    "STOP_MARKS",
    "load_templates",
    "get_template",
    "seed_instruction_text",
    "build_brainstorm_prompt",
    "build_response_prompt",
    "BRAINSTORM_REQUEST",
]

INSTRUCTION_MARK = "### Instruction:"
RESPONSE_MARK = "### Response:"
# Generation stops at the start of the next section; without the colon so "### Instruction 2" and
# "### Response" spelled slightly differently by a small model still end the text.
STOP_MARKS = ("### Instruction", "### Response")
#: The end of the chat-format brainstorm message, after the numbered seed instructions.
BRAINSTORM_REQUEST = ("Write one new instruction in the style of these examples, different from all of them. "
                      "Reply with the new instruction only.")


@dataclass(frozen=True)
class DomainTemplate:
    """The two prompt texts of one domain (see the module docstring)."""

    brainstorm: str
    system: str

    def for_domain(self, domain: str) -> "DomainTemplate":
        return DomainTemplate(self.brainstorm.replace("{domain}", domain), self.system.replace("{domain}", domain))


DEFAULT_TEMPLATES: Dict[str, DomainTemplate] = {
    "knowledge": DomainTemplate(
        brainstorm=(
            "You are writing exam questions that test expert knowledge across academic and professional "
            "subjects such as history, law, medicine, biology, physics, economics and philosophy. Each "
            "question is multiple choice: a clear question followed by four options labelled (A), (B), (C) "
            "and (D), exactly one of which is correct. Choose a subject and a fact different from the "
            "examples. Write only the question and its options; do not reveal the answer."
        ),
        system=(
            "You are a knowledge expert with a deep command of academic and professional subjects. Read the "
            "multiple-choice question, reason briefly about the options, and finish with the letter of the "
            "correct option."
        ),
    ),
    "reasoning": DomainTemplate(
        brainstorm=(
            "You are writing puzzles that take several steps of careful reasoning to solve: logical "
            "deduction, ordering objects, following a sequence of moves or swaps, dates and time, spatial "
            "relations, truth tables or word sorting. Each puzzle states everything needed to solve it and "
            "has one correct answer. Make it different from the examples. Write only the puzzle, not its "
            "solution."
        ),
        system=(
            "You are a reasoning expert. Work through the problem one step at a time, keep track of every "
            "fact you derive, and state the final answer clearly at the end."
        ),
    ),
    "math": DomainTemplate(
        brainstorm=(
            "You are writing math word problems for students. Each problem describes an everyday situation, "
            "gives all the numbers needed, takes a few steps of arithmetic to solve, and has exactly one "
            "numerical answer. Use a situation and numbers different from the examples. Write only the "
            "problem, not its solution."
        ),
        system=(
            "You are a math expert. Solve the problem step by step, showing each calculation, and end with "
            "the final numerical answer."
        ),
    ),
    "coding": DomainTemplate(
        brainstorm=(
            "You are writing Python programming exercises. Each exercise is a function signature with a "
            "docstring that explains precisely what the function must return, followed by a few assert "
            "statements that a correct implementation passes. Pick a task different from the examples. "
            "Write only the signature, docstring and tests; do not write the function body."
        ),
        system=(
            "You are a coding expert who writes correct, readable Python. Implement the requested function "
            "so that it passes the given tests, and return the complete code."
        ),
    ),
}

GENERIC_TEMPLATE = DomainTemplate(
    brainstorm=(
        "You are writing new tasks in the domain of {domain}. Each task is self-contained, clearly worded and "
        "has a well-defined answer. Make it different from the examples. Write only the task, not its answer."
    ),
    system="You are a {domain} expert. Answer the task accurately and completely.",
)

TemplateSource = Union[None, str, "os.PathLike[str]", Mapping[str, Any]]


def load_templates(source: TemplateSource = None) -> Dict[str, DomainTemplate]:
    """The built-in templates, updated with user ones from a dict or a JSON file.

    Shape: ``{"math": {"brainstorm": "...", "system": "..."}, "law": {...}}``. A domain given with only
    one key keeps the built-in (or generic) text for the other. Raises ``FileNotFoundError`` /
    ``ValueError`` naming the file and the offending domain or key.
    """
    out = dict(DEFAULT_TEMPLATES)
    if source is None:
        return out
    where = "templates"
    if isinstance(source, (str, os.PathLike)):
        path = pathlib.Path(source)
        where = os.fspath(source)
        if not path.is_file():
            raise FileNotFoundError(f"{where}: template file not found")
        try:
            source = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    if not isinstance(source, Mapping):
        raise ValueError(f"{where}: expected a mapping of domain -> template, got {type(source).__name__}")
    allowed = {f.name for f in fields(DomainTemplate)}
    for domain, spec in source.items():
        if isinstance(spec, DomainTemplate):
            out[domain] = spec
            continue
        if not isinstance(spec, Mapping):
            raise ValueError(f"{where}: template for domain {domain!r} must be an object, got {type(spec).__name__}")
        unknown = set(spec) - allowed
        if unknown:
            raise ValueError(f"{where}: template for domain {domain!r} has unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
        base = out.get(domain, GENERIC_TEMPLATE)
        values = {k: spec.get(k, getattr(base, k)) for k in allowed}
        for k, v in values.items():
            if not isinstance(v, str) or not v.strip():
                raise ValueError(f"{where}: template {domain!r}.{k} must be a non-empty string")
        out[domain] = DomainTemplate(**values)
    return out


def get_template(domain: str, templates: Optional[Mapping[str, DomainTemplate]] = None) -> DomainTemplate:
    """The template for ``domain`` (``{domain}`` filled in), the generic one when it has none."""
    table = DEFAULT_TEMPLATES if templates is None else templates
    return table.get(domain, GENERIC_TEMPLATE).for_domain(domain)


def seed_instruction_text(record: Mapping[str, Any]) -> str:
    """A seed's instruction with its input appended: generated instructions hold everything in one field."""
    instruction = str(record["instruction"]).strip()
    inp = str(record.get("input", "") or "").strip()
    return f"{instruction}\n\n{inp}" if inp else instruction


def build_brainstorm_prompt(template: DomainTemplate, seeds: Sequence[Mapping[str, Any]], *, fmt: str = "alpaca",
                            tokenizer: Any = None) -> str:
    """Header, the seed instructions, then an open instruction slot for the model to fill (``fmt="chat"``:
    one user message asking for a new instruction, and the generation prompt)."""
    if _is_chat(fmt, tokenizer):
        from .prompt_format import render_chat

        examples = "\n\n".join(f"{i}. {seed_instruction_text(s)}" for i, s in enumerate(seeds, 1))
        content = f"{template.brainstorm.strip()}\n\n{examples}\n\n{BRAINSTORM_REQUEST}"
        return render_chat(tokenizer, [{"role": "user", "content": content}], add_generation_prompt=True)
    parts = [template.brainstorm.strip(), ""]
    for s in seeds:
        parts += [INSTRUCTION_MARK, seed_instruction_text(s), ""]
    parts.append(INSTRUCTION_MARK)
    return "\n".join(parts) + "\n"


def build_response_prompt(template: DomainTemplate, seeds: Sequence[Mapping[str, Any]], instruction: str, *,
                          fmt: str = "alpaca", tokenizer: Any = None) -> str:
    """Expert system prompt, the seed pairs, then the new instruction and an open response slot
    (``fmt="chat"``: system message, the pairs as user/assistant turns, the instruction as the last
    user turn, and the generation prompt)."""
    if _is_chat(fmt, tokenizer):
        from .prompt_format import render_chat, with_system

        messages = []
        for s in seeds:
            messages += [{"role": "user", "content": seed_instruction_text(s)},
                         {"role": "assistant", "content": str(s["output"]).strip()}]
        messages.append({"role": "user", "content": instruction.strip()})
        return render_chat(tokenizer, with_system(tokenizer, template.system, messages), add_generation_prompt=True)
    parts = [template.system.strip(), ""]
    for s in seeds:
        parts += [INSTRUCTION_MARK, seed_instruction_text(s), "", RESPONSE_MARK, str(s["output"]).strip(), ""]
    parts += [INSTRUCTION_MARK, instruction.strip(), "", RESPONSE_MARK]
    return "\n".join(parts) + "\n"


def _is_chat(fmt: str, tokenizer: Any) -> bool:
    if fmt == "alpaca":
        return False
    from .prompt_format import resolve_prompt_format

    return resolve_prompt_format(fmt, tokenizer) == "chat"
