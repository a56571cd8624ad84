"""A tiny randomly initialised chat model that reads any text: a byte-level tokenizer and a 1-layer Qwen2.

The embedded addition model's tokenizer knows 16 symbols and drops every other
character, so a GSM8K question would reach it as its digits alone. This one is
built the way Qwen's is (a byte-level BPE, here with no merges: one token per
byte) with ChatML turns (``<|im_start|>``/``<|im_end|>``, Qwen2.5-Instruct's chat
template without the system turn), so verl-layout chat prompts render and decode
as they would for a real Hugging Face model directory.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from sfpo_train.tasks.addition import save_tokenizer

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """256 byte tokens (ids 0-255, in the byte-level alphabet) then ``<|endoftext|>`` (pad), ``<|im_start|>``,
    ``<|im_end|>`` (EOS, the end of an assistant turn as in Qwen2.5-Instruct)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins of the bytes
    vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([PAD, IM_START, IM_END])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        eos_token=IM_END,
        extra_special_tokens=[IM_START],
        padding_side="left",
        model_input_names=["input_ids", "attention_mask"],
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def write_tiny_text_model(path: str, *, max_positions: int = 256) -> str:
    """A random 1-layer Qwen2 (hidden 32) and :func:`build_byte_tokenizer` saved as a transformers model directory."""
    tokenizer = build_byte_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        Qwen2ForCausalLM(config).save_pretrained(path)
    save_tokenizer(tokenizer, path)
    return path
