"""A tiny, randomly initialised Llama with a byte-level tokenizer made locally.

Used by tests and ``configs/tiny.yaml`` so that everything runs in seconds with no download:
the tokenizer is a real Hugging Face fast tokenizer (byte-level BPE over the 256 byte symbols,
no merges, ChatML special tokens and chat template) and the model a real ``LlamaForCausalLM``.
It is random: it shows that the machinery works, not that anything is learned.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lightning_safety.paths import atomic_directory, cache_root, save_pretrained_here

TINY_MODEL_ALIAS = "tiny-random-llama"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""ChatML, the format of SmolLM2 and Qwen: a small, explicit template for local tokenizers."""


def build_byte_tokenizer(chat_template: str | None = CHATML_TEMPLATE):
    """A byte-level BPE fast tokenizer with ChatML special tokens (vocabulary 259)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def build_tiny_llama(
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    intermediate_size: int = 128,
    vocab_size: int = 259,
    seed: int = 0,
):
    """A randomly initialised ``LlamaForCausalLM`` small enough for unit tests (~115k weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_attention_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=257,
        eos_token_id=258,
        pad_token_id=256,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()


def tiny_model_folder(root: Path | None = None, seed: int = 0) -> Path:
    """Build (once) and return a local folder holding the tiny model and its tokenizer."""
    target = (root or cache_root()) / f"{TINY_MODEL_ALIAS}-seed{seed}"
    if (target / "config.json").exists():
        return target
    tokenizer = build_byte_tokenizer()
    model = build_tiny_llama(vocab_size=len(tokenizer), seed=seed)
    with atomic_directory(target) as tmp:
        save_pretrained_here(model, tmp)
        tokenizer.save_pretrained(tmp)
    return target
