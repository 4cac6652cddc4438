"""lit_prune: task-specific MLP neuron pruning, LoRA recovery and evaluation for SwiGLU LLMs."""

__version__ = "0.1.0"
