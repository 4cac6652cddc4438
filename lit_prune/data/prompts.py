"""Turn examples into model input text: the paper's instructions (Appendix E) and the chat template."""

from __future__ import annotations

import logging

from lit_prune.data.sources import Example

__all__ = ["CODE_INSTRUCTION", "MATH_INSTRUCTION", "PROMPT_FORMAT", "format_prompt", "instruction_for", "render_prompt"]

log = logging.getLogger(__name__)

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CODE_INSTRUCTION = "You are a helpful coding assistant. Write correct, self-contained Python code."

_INSTRUCTIONS = {"math": MATH_INSTRUCTION, "code": CODE_INSTRUCTION}

# Version of :func:`render_prompt`'s output, part of the key cached reference outputs are stored under: outputs
# generated from prompts rendered another way are never reused. 2: generation renders as fine-tuning does.
PROMPT_FORMAT = 2


def instruction_for(kind: str) -> str | None:
    """The system instruction the paper uses for a task kind (None for distractor kinds)."""
    return _INSTRUCTIONS.get(kind)


def format_prompt(tokenizer, example: Example | str, kind: str | None = None) -> str:
    """The text a model sees for ``example``, ending where its answer begins.

    With a chat template: the instruction as system message, the prompt as user message and the
    generation prompt. Without one: instruction and prompt separated by newlines.
    """
    if isinstance(example, str):
        example = Example(example, None, kind or "text")
    return render_prompt(tokenizer, example.prompt, instruction_for(kind or example.kind))


def render_prompt(tokenizer, prompt: str, system: str | None = None) -> str:
    """``prompt`` as a user message after an optional ``system`` message, ending where the answer begins.

    The one rendering of prompts: fine-tuning, capture and perplexity (through :func:`format_prompt`) and
    generation (:func:`lit_prune.eval.generate`) all use it, so a model is evaluated on the text it was trained
    on. With a chat template: the template with the generation prompt. Without one: ``system``, a blank line, the
    prompt and a newline.
    """
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return (f"{system}\n\n" if system else "") + prompt + "\n"
