"""The embedded default task: tokenizer, reward, data rows, the shipped assets, and the two scripts."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2ForCausalLM

from sfpo_train import tasks
from sfpo_train.tasks import addition

ROOT = Path(__file__).resolve().parents[2]


def _load_script(name: str):
    """A script under scripts/ as a module, so its ``main(argv)`` runs in this process (no second torch import)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _operands(row: dict) -> tuple[int, int]:
    content = row["prompt"][0]["content"]
    assert content.endswith("="), content
    a, b = content[:-1].split("+")
    return int(a), int(b)


@pytest.fixture(scope="module")
def shipped():
    """The shipped model, tokenizer and rows, loaded the way the trainer loads them."""
    paths = tasks.default_paths()
    model = AutoModelForCausalLM.from_pretrained(paths["model"], local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(paths["model"], local_files_only=True)
    return paths, model, tokenizer, tasks.load_rows(paths["train_files"]), tasks.load_rows(paths["val_files"])


# --- tokenizer ---------------------------------------------------------------------------------------


def test_tokenizer_vocabulary_and_ids():
    tok = addition.build_tokenizer()
    assert len(tok) == 16 and tok.vocab_size == 16
    # the 14 symbols of the first tokenizer keep their ids; the newline is stored in its byte-level form
    assert addition.SYMBOLS[:14] == ["<pad>", "<eos>", *"0123456789", "+", "="]
    expected = {s: i for i, s in enumerate(addition.SYMBOLS)}
    expected["\u010a"] = expected.pop("\n")  # "Ċ", as in Qwen's vocabulary
    assert tok.get_vocab() == expected
    assert (tok.pad_token, tok.pad_token_id, tok.eos_token, tok.eos_token_id) == ("<pad>", 0, "<eos>", 1)
    assert tok.encode("123+456=") == [3, 4, 5, 12, 6, 7, 8, 13]  # no BOS added
    assert tok.encode("1<eos>") == [3, 1]  # special tokens stay whole
    assert tok.encode("1 a2") == [3, 4]  # no unknown token: foreign characters are dropped


def test_tokenizer_newline_and_im_end_for_verls_agent_loop():
    tok = addition.build_tokenizer()
    assert tok.encode("\n", add_special_tokens=False) == [14]  # an ordinary token, one per newline
    assert tok.encode("1\n\n2") == [3, 14, 14, 4] and tok.encode("\r\n") == [14]  # "\r" is foreign
    assert tok.convert_tokens_to_ids("<|im_end|>") == 15 and tok.encode("<|im_end|>") == [15]
    assert "<|im_end|>" in tok.all_special_tokens and "\n" not in tok.all_special_tokens
    ids = tok.encode("12<|im_end|>\n3=")
    assert ids == [3, 4, 15, 14, 5, 13]
    assert tok.decode(ids) == "12<|im_end|>\n3="
    assert tok.decode(ids, skip_special_tokens=True) == "12\n3="


@pytest.mark.parametrize("text", ["123+456=", "999+999=1998", "0", "+=+=", "1\n2\n"])
def test_tokenizer_round_trip_without_spaces(text):
    tok = addition.build_tokenizer()
    ids = tok.encode(text)
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    assert tok.decode(ids + [tok.eos_token_id, tok.pad_token_id], skip_special_tokens=True) == text
    assert tok.decode(ids + [tok.eos_token_id]) == text + "<eos>"


def test_tokenizer_chat_template_is_the_bare_prompt():
    tok = addition.build_tokenizer()
    messages = [{"role": "user", "content": "123+456="}]
    assert tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == "123+456="
    two = [{"role": "system", "content": "1"}, {"role": "user", "content": "2+3="}]
    assert tok.apply_chat_template(two, add_generation_prompt=True, tokenize=False) == "12+3="


def test_tokenizer_pads_on_the_left():
    tok = addition.build_tokenizer()
    batch = tok(["1+2=", "123+456="], padding=True, add_special_tokens=False)
    assert tok.padding_side == "left"
    assert batch["input_ids"][0] == [0, 0, 0, 0, 3, 12, 4, 13]
    assert batch["attention_mask"][0] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert batch["attention_mask"][1] == [1] * 8


def test_model_config_sizes():
    config = addition.build_model_config()
    model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == 527_744
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    assert (config.vocab_size, config.pad_token_id, config.eos_token_id) == (16, 0, 1)
    assert config.max_position_embeddings >= addition.PROMPT_TOKENS + addition.MAX_NEW_TOKENS


# --- reward -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response,score",
    [("579", 1.0), (" 579\n", 1.0), ("578", 0.0), ("5790", 0.0), ("57", 0.0), ("", 0.0), ("5 79", 0.0)],
)
def test_compute_score(response, score):
    assert addition.compute_score("sfpo/addition", response, "579") == score
    assert tasks.compute_score("sfpo/addition", response, "579", extra_info={"split": "test", "index": 0}) == score
    assert tasks.compute_score(data_source="sfpo/addition", solution_str=response, ground_truth="579") == score


def test_compute_score_rejects_an_unknown_data_source():
    with pytest.raises(ValueError, match=r"'openai/gsm8k'.*known: \['sfpo/addition'\]"):
        tasks.compute_score("openai/gsm8k", "579", "579")
    with pytest.raises(ValueError, match="'openai/gsm8k'"):
        addition.compute_score("openai/gsm8k", "579", "579")


# --- rows ---------------------------------------------------------------------------------------------


def test_rows_follow_verls_layout_and_carry_the_right_sum():
    rows = addition.make_rows(300, seed=3, split="train")
    assert len(rows) == 300
    for i, row in enumerate(rows):
        assert set(row) == {"data_source", "prompt", "ability", "reward_model", "extra_info"}
        assert row["data_source"] == "sfpo/addition" and row["ability"] == "math"
        assert len(row["prompt"]) == 1 and row["prompt"][0]["role"] == "user"
        a, b = _operands(row)
        assert 100 <= a <= 999 and 100 <= b <= 999
        assert row["reward_model"] == {"style": "rule", "ground_truth": str(a + b)}
        assert row["extra_info"] == {"split": "train", "index": i}
    assert len({_operands(r) for r in rows}) == 300  # no repeats within a split


def test_rows_are_seeded_and_the_test_pool_is_disjoint_from_every_train_set():
    assert addition.make_rows(50, 7, "test") == addition.make_rows(50, 7, "test")
    assert addition.make_rows(50, 7, "train") != addition.make_rows(50, 8, "train")
    test = {_operands(r) for seed in (0, 1) for r in addition.make_rows(2000, seed, "test")}
    train = {_operands(r) for seed in (0, 1) for r in addition.make_rows(20000, seed, "train")}
    assert not test & train
    assert not {(b, a) for a, b in test} & train  # held out in both operand orders
    with pytest.raises(ValueError, match="n=20000 exceeds"):
        addition.make_rows(20000, 0, "test")
    with pytest.raises(ValueError, match="n must be"):
        addition.make_rows(-1, 0, "train")


# --- the shipped assets -------------------------------------------------------------------------------


def test_default_paths_point_at_the_shipped_files():
    paths = tasks.default_paths()
    assert set(paths) == {"model", "train_files", "val_files"}
    assert all(Path(p).is_absolute() and Path(p).exists() for p in paths.values())
    assert tasks.DEFAULT_TASK == "addition" and tasks.default_paths("addition") == paths
    with pytest.raises(ValueError, match="unknown task 'gsm8k'"):
        tasks.default_paths("gsm8k")


def test_shipped_data_is_what_the_data_script_writes(shipped):
    _, _, _, train, test = shipped
    assert test == addition.make_rows(500, 0, "test")
    assert train == addition.make_rows(20000, 0, "train")
    # pandas, as verl reads it, sees the same columns
    frame = pd.read_parquet(tasks.default_paths()["val_files"])
    assert list(frame.columns) == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
    assert frame.iloc[0]["reward_model"]["ground_truth"] == test[0]["reward_model"]["ground_truth"]


def test_shipped_tokenizer_matches_the_built_one(shipped):
    paths, _, loaded, _, _ = shipped
    built = addition.build_tokenizer()
    # transformers 5 loads any Qwen2 checkpoint's tokenizer as its own class; it must still be our 16 symbols
    assert len(loaded) == 16 and loaded.get_vocab() == built.get_vocab()
    assert loaded.padding_side == "left" and (loaded.pad_token_id, loaded.eos_token_id) == (0, 1)
    assert loaded.encode("\n", add_special_tokens=False) == [14] and loaded.convert_tokens_to_ids("<|im_end|>") == 15
    for text in ["123+456=", "999+999=1998<eos>", "+=+=0", "1 a2", "<pad><pad>12+3=", "1\n2<|im_end|>\n"]:
        assert loaded.encode(text) == built.encode(text), text
        assert loaded.decode(built.encode(text)) == built.decode(built.encode(text)), text
        skipped = built.decode(built.encode(text), skip_special_tokens=True)
        assert loaded.decode(built.encode(text), skip_special_tokens=True) == skipped, text
    batch = loaded(["1+2=", "123+456="], padding=True, add_special_tokens=False)
    assert batch["input_ids"][0] == [0, 0, 0, 0, 3, 12, 4, 13]
    assert set(batch) == {"input_ids", "attention_mask"}  # no token_type_ids, which generate() rejects
    assert (
        loaded.apply_chat_template([{"role": "user", "content": "1+2="}], add_generation_prompt=True, tokenize=False)
        == "1+2="
    )
    # a class name transformers 4.x (verl) resolves too
    config = json.loads((Path(paths["model"]) / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_shipped_model_files(shipped):
    paths, model, _, _, _ = shipped
    directory = Path(paths["model"])
    weights = load_file(directory / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in weights.values())
    generation = json.loads((directory / "generation_config.json").read_text())
    assert (generation["eos_token_id"], generation["pad_token_id"]) == (1, 0)
    assert "do_sample" not in generation and "temperature" not in generation  # sampling is the trainer's call
    assert model.config.vocab_size == 16 and sum(p.numel() for p in model.parameters()) == 527_744


def test_shipped_model_leaves_room_for_rl(shipped):
    _, model, tokenizer, _, test = shipped
    greedy = tasks.evaluate(model, tokenizer, test, max_new_tokens=addition.MAX_NEW_TOKENS, batch_size=500)
    assert 0.15 <= greedy <= 0.60, f"shipped model's greedy test accuracy {greedy:.3f} is outside [0.15, 0.60]"
    torch.manual_seed(0)
    sampled = tasks.evaluate(
        model, tokenizer, test, max_new_tokens=addition.MAX_NEW_TOKENS, batch_size=500, do_sample=True
    )
    assert sampled < greedy


# --- evaluate -----------------------------------------------------------------------------------------


def test_evaluate_batches_left_pad_and_restore_the_mode(shipped):
    _, model, tokenizer, _, test = shipped
    # prompts of different lengths in one batch: left padding must not change any greedy answer
    rows = [{"prompt": [{"role": "user", "content": c}]} for c in ("123+456=", "99+1=", "5+5=", "700+300=")]
    batched = tasks.generate_responses(model, tokenizer, rows, max_new_tokens=5, batch_size=4)
    alone = [tasks.generate_responses(model, tokenizer, [r], max_new_tokens=5, batch_size=1)[0] for r in rows]
    assert batched == alone
    model.train()
    responses = tasks.generate_responses(model, tokenizer, test[:60], max_new_tokens=5, batch_size=60)
    assert model.training
    # three batches, the last one short: same accuracy as the responses scored by hand
    accuracy = tasks.evaluate(model, tokenizer, test[:60], max_new_tokens=5, batch_size=25)
    assert accuracy == sum(r == row["reward_model"]["ground_truth"] for r, row in zip(responses, test)) / 60
    assert 0 < accuracy < 1
    model.eval()


def test_evaluate_rejects_bad_arguments(shipped):
    _, model, tokenizer, _, test = shipped
    with pytest.raises(ValueError, match="rows must not be empty"):
        tasks.evaluate(model, tokenizer, [], max_new_tokens=5, batch_size=8)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        tasks.evaluate(model, tokenizer, test, max_new_tokens=5, batch_size=0)
    right = addition.build_tokenizer()
    right.padding_side = "right"
    with pytest.raises(ValueError, match="padding_side must be 'left'"):
        tasks.evaluate(model, right, test, max_new_tokens=5, batch_size=8)


# --- the scripts --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "script,options",
    [
        ("make_addition_data", ["--out", "--train-size", "--test-size", "--seed"]),
        (
            "train_addition_model",
            [
                "--data",
                "--out",
                "--steps",
                "--batch-size",
                "--lr",
                "--warmup-steps",
                "--weight-decay",
                "--seed",
                "--eval-every",
                "--eval-batch-size",
                "--no-progress",
            ],
        ),
    ],
)
def test_script_help_lists_every_option(script, options, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _load_script(script).main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(option in out for option in options)


def test_scripts_run_end_to_end_and_train_deterministically(tmp_path, capsys):
    make_data, train = _load_script("make_addition_data"), _load_script("train_addition_model")
    assert make_data.main(["--out", str(tmp_path), "--train-size", "200", "--test-size", "20", "--seed", "1"]) == 0
    assert tasks.load_rows(tmp_path / "test.parquet") == addition.make_rows(20, 1, "test")
    outs = [tmp_path / "model-a", tmp_path / "model-b"]
    for out in outs:
        argv = [
            "--data",
            str(tmp_path),
            "--out",
            str(out),
            "--steps",
            "3",
            "--batch-size",
            "16",
            "--eval-every",
            "2",
            "--eval-batch-size",
            "8",
            "--no-progress",
        ]
        assert train.main(argv) == 0
    log = capsys.readouterr().out
    assert "step     2" in log and "greedy test accuracy" in log and "sampled (T=1" in log
    model = AutoModelForCausalLM.from_pretrained(outs[0], local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(outs[0], local_files_only=True)
    assert tokenizer.encode("1+2=") == [3, 12, 4, 13] and model.config.num_hidden_layers == 2
    assert tokenizer.encode("\n") == [14] and model.config.vocab_size == len(tokenizer) == 16
    a, b = (load_file(out / "model.safetensors") for out in outs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.random.fork_rng(devices=[]):  # the weights the script starts from (its default --seed 0)
        torch.manual_seed(0)
        start = Qwen2ForCausalLM(addition.build_model_config()).state_dict()
    untrained = [k for k in a if torch.equal(a[k], start[k])]
    assert not untrained, f"left at their initial values: {untrained}"  # it did train (AdamW decays every tensor)
    # ... from those weights: 3 warm-up steps at lr 1e-5, 2e-5, 3e-5 move an element by ~6e-5 (an Adam step is
    # ~lr; measured 6.1e-5), while seed 1's initialisation is 0.13 away, so 1e-3 tells the two apart
    moved = {k: float((a[k] - start[k]).abs().max()) for k in a}
    assert max(moved.values()) < 1e-3, moved
    with pytest.raises(SystemExit):
        train.main(["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "x")])
    assert "has no train.parquet" in capsys.readouterr().err
