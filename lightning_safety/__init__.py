"""lightning_safety: fine-tune instruction-tuned LLMs with Lightning without losing safety alignment."""

__version__ = "0.1.0"
