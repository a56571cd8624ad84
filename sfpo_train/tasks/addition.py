"""The embedded default task: 3-digit addition, ``abc+def=`` -> the decimal sum.

Everything the default ``sfpo train`` run needs to build, score and regenerate
the task and its tiny model:

- problems: ``a+b=`` with ``a, b`` in [100, 999]; the answer is ``str(a + b)``
  (3 or 4 digits), so a prompt is always 8 tokens and a correct response at
  most 5 (answer + EOS);
- :func:`build_tokenizer`: a character-level fast tokenizer over 16 symbols
  (``<pad>``, ``<eos>``, ``0``-``9``, ``+``, ``=``, newline, ``<|im_end|>``);
- :func:`build_model_config`: a 527,744-parameter Qwen2 (hidden 128, 2 layers,
  4 heads, intermediate 512, tied embeddings);
- :func:`make_rows`: problems in verl's parquet layout, test and train drawn
  from disjoint pools;
- :func:`compute_score`: verl's reward signature, 1.0 for the exact sum.

The shipped model and data in ``sfpo_train/assets/addition`` were made by
``scripts/make_addition_data.py`` and ``scripts/train_addition_model.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config

DATA_SOURCE = "sfpo/addition"
ABILITY = "math"
LOW, HIGH = 100, 999  # both operands are drawn from [LOW, HIGH]

PAD, EOS = "<pad>", "<eos>"
# The last two symbols are never in a prompt or an answer; verl's agent loop needs them. It picks its
# continuous-token builder from config.json's model_type (qwen2 -> QwenContinuousTokenBuilder), which
# requires "\n" to be one token and "<|im_end|>" to have an id (the ChatML turn end it re-joins turns at).
NEWLINE, IM_END = "\n", "<|im_end|>"
# Appended at the end, so ids 0-13 mean what they meant in the 14-symbol tokenizer.
SYMBOLS = [PAD, EOS, *"0123456789", "+", "=", NEWLINE, IM_END]
SPECIAL = [PAD, EOS, IM_END]  # matched whole in text, dropped by decode(skip_special_tokens=True)
PAD_ID, EOS_ID, NEWLINE_ID, IM_END_ID = 0, 1, 14, 15
PROMPT_TOKENS = 8  # "abc+def="
MAX_NEW_TOKENS = 5  # up to 4 answer digits + EOS

# Test problems come from a fixed pool of unordered pairs {a, b}: both a+b and
# b+a are held out, so a model cannot have learned a test problem from its
# mirror image in the train set. The pool is chosen by a permutation with a
# fixed seed, independent of the seed a caller passes to make_rows, so any
# train set is disjoint from any test set.
TEST_POOL_PAIRS = 5000
_POOL_SEED = 20250101

# A chat template that only concatenates the contents: verl builds a prompt
# with apply_chat_template(messages, add_generation_prompt=True), and for this
# task the prompt must be the bare "abc+def=".
CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The task's character-level tokenizer: one token per character, ids as in :data:`SYMBOLS`.

    ``encode("123+456=") == [3, 4, 5, 12, 6, 7, 8, 13]``; no BOS is added and
    decoding joins characters without spaces. A newline is the ordinary token
    14; ``<pad>``, ``<eos>`` and ``<|im_end|>`` (15) are special tokens, kept
    whole in text and dropped by ``decode(..., skip_special_tokens=True)``.
    Padding is on the left, which batched ``generate`` needs. Characters
    outside the vocabulary are dropped, as there is no unknown token (the
    task's prompts never contain one).

    It is built the way transformers 5 rebuilds any Qwen2 checkpoint's
    tokenizer from the saved vocabulary (``Qwen2Tokenizer``), so the built and
    the loaded tokenizer agree: a BPE with no merges (every token is one
    character) behind a byte-level pre-tokenizer and decoder. Byte-level maps
    each byte to a printable character (the digits, ``+`` and ``=`` to
    themselves, the newline to ``"Ċ"``), and the vocabulary holds those
    characters, as Qwen's own vocabulary does.
    """
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    vocab = {}
    for i, symbol in enumerate(SYMBOLS):
        vocab[symbol if symbol in SPECIAL else _byte_level(byte_level, symbol)] = i
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    # Split into single characters, newlines included ("." alone does not match
    # a newline), then map each to its byte-level form; the special tokens are
    # matched before the pre-tokenizer runs, so "<eos>" in text stays one token.
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(".|\n"), behavior="isolated"), byte_level])
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(SPECIAL)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        eos_token=EOS,
        extra_special_tokens=[IM_END],
        padding_side="left",
        # transformers 4.x would also return token_type_ids, which generate() rejects for Qwen2
        model_input_names=["input_ids", "attention_mask"],
        model_max_length=32,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    ids = [tokenizer.convert_tokens_to_ids(t) for t in (PAD, EOS, IM_END)] + tokenizer.encode(NEWLINE)
    assert ids == [PAD_ID, EOS_ID, IM_END_ID, NEWLINE_ID], ids
    return tokenizer


def _byte_level(pre_tokenizer: pre_tokenizers.ByteLevel, char: str) -> str:
    """``char`` in the byte-level alphabet (``"7"`` -> ``"7"``, newline -> ``"Ċ"``); one byte, one character."""
    ((piece, _),) = pre_tokenizer.pre_tokenize_str(char)
    assert len(piece) == 1, (char, piece)
    return piece


def build_model_config() -> Qwen2Config:
    """The task model's config: Qwen2, vocab 16, hidden 128, 2 layers x 4 heads, MLP 512, tied embeddings.

    527,744 parameters. Like Qwen, BOS and EOS share an id (the tokenizer never
    adds a BOS); PAD is id 0. 32 positions cover the 8-token prompt plus 5 new
    tokens with room to spare.
    """
    return Qwen2Config(
        vocab_size=len(SYMBOLS),
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=512,
        max_position_embeddings=32,
        tie_word_embeddings=True,
        pad_token_id=PAD_ID,
        bos_token_id=EOS_ID,
        eos_token_id=EOS_ID,
    )


def _test_pool() -> np.ndarray:
    """The held-out unordered pairs, ``[TEST_POOL_PAIRS, 2]`` with ``a <= b``, in a fixed order."""
    a, b = np.triu_indices(HIGH - LOW + 1)  # every unordered pair once, a <= b
    pick = np.random.default_rng(_POOL_SEED).permutation(a.size)[:TEST_POOL_PAIRS]
    return np.stack([a[pick], b[pick]], axis=1) + LOW


def _pair_codes(pairs: np.ndarray) -> np.ndarray:
    """A unique integer per ordered pair ``(a, b)``: ``(a - LOW) * span + (b - LOW)``."""
    span = HIGH - LOW + 1
    return (pairs[:, 0] - LOW) * span + (pairs[:, 1] - LOW)


def make_problems(n: int, seed: int, split: str) -> list[tuple[int, int]]:
    """``n`` distinct ordered pairs ``(a, b)``, drawn with ``seed`` from the split's pool.

    ``split="test"`` draws from the held-out pool (both orders of
    :data:`TEST_POOL_PAIRS` unordered pairs); any other split draws from every
    other pair (about 800,000). Same ``(n, seed, split)``, same list.
    """
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if not isinstance(split, str) or not split:
        raise ValueError(f"split must be a non-empty string such as 'train' or 'test', got {split!r}")
    span = HIGH - LOW + 1
    pool = _test_pool()
    held_out = np.unique(_pair_codes(np.concatenate([pool, pool[:, ::-1]])))
    if split == "test":
        codes = held_out
    else:
        codes = np.setdiff1d(np.arange(span * span), held_out, assume_unique=True)
    if n > codes.size:
        raise ValueError(f"n={n} exceeds the {codes.size} problems in the {split!r} pool")
    chosen = np.random.default_rng(seed).choice(codes, size=n, replace=False)
    return [(int(c // span) + LOW, int(c % span) + LOW) for c in chosen]


def make_rows(n: int, seed: int, split: str) -> list[dict]:
    """``n`` problems as rows in verl's parquet layout.

    One row::

        {"data_source": "sfpo/addition",
         "prompt": [{"role": "user", "content": "123+456="}],
         "ability": "math",
         "reward_model": {"style": "rule", "ground_truth": "579"},
         "extra_info": {"split": split, "index": i}}

    Problems come from :func:`make_problems`, so the test split never shares a
    problem (in either order) with any other split.
    """
    rows = []
    for i, (a, b) in enumerate(make_problems(n, seed, split)):
        rows.append(
            {
                "data_source": DATA_SOURCE,
                "prompt": [{"role": "user", "content": f"{a}+{b}="}],
                "ability": ABILITY,
                "reward_model": {"style": "rule", "ground_truth": str(a + b)},
                "extra_info": {"split": split, "index": i},
            }
        )
    return rows


def compute_score(data_source: str, solution_str: str, ground_truth: str, extra_info: dict | None = None) -> float:
    """verl's reward signature: 1.0 iff ``solution_str.strip() == ground_truth``, else 0.0.

    ``solution_str`` is the response decoded with ``skip_special_tokens=True``
    (as verl does), so a response that stops at EOS after the exact sum scores
    1.0 and one that runs on with more digits scores 0.0.
    """
    if data_source != DATA_SOURCE:
        raise ValueError(f"addition.compute_score got data_source {data_source!r}, expected {DATA_SOURCE!r}")
    return 1.0 if solution_str.strip() == str(ground_truth) else 0.0


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: str | Path) -> None:
    """``tokenizer.save_pretrained(directory)``, written so that ``AutoTokenizer`` loads the same tokenizer
    in transformers 4.x (verl) and 5.x.

    - ``tokenizer_class`` is ``PreTrainedTokenizerFast``: transformers 5 records
      ``TokenizersBackend``, a name 4.x does not know (in 5.x the two are the same class).
    - ``unk_token`` and ``bos_token`` are null: transformers 5 loads a Qwen2
      checkpoint's tokenizer as ``Qwen2Tokenizer``, which would otherwise add
      ``<|endoftext|>`` as a 17th token, beyond the model's 16 embeddings.
    - ``<|im_end|>`` is listed as ``additional_special_tokens``: transformers 5
      writes ``extra_special_tokens`` as a list, which 4.x reads as a dict of
      named tokens; both read the older key.
    """
    tokenizer.save_pretrained(directory)
    config_path = Path(directory) / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update(tokenizer_class="PreTrainedTokenizerFast", unk_token=None, bos_token=None)
    config["additional_special_tokens"] = config.pop("extra_special_tokens", [])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
