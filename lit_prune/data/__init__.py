"""Data: example sources (hub presets and local files), prompt formatting and the DataModule."""

from lit_prune.data.datamodule import PruneDataModule, SupervisedCollator, tokenize_supervised
from lit_prune.data.prompts import CODE_INSTRUCTION, MATH_INSTRUCTION, format_prompt, instruction_for
from lit_prune.data.sources import KINDS, PRESETS, Example, gsm8k_response, load_examples, load_texts

__all__ = [
    "CODE_INSTRUCTION",
    "KINDS",
    "MATH_INSTRUCTION",
    "PRESETS",
    "Example",
    "PruneDataModule",
    "SupervisedCollator",
    "format_prompt",
    "gsm8k_response",
    "instruction_for",
    "load_examples",
    "load_texts",
    "tokenize_supervised",
]
