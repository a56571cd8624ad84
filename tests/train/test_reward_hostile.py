"""Hostile reward functions: ``sys.exit()`` in the function or at import, rewards no float can hold.

Each is refused as a raising reward is: a ``ValueError`` naming the function and
the sample, and ``sfpo train`` ends non-zero with one line, not silently with
exit 0 nor with a traceback.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest

from sfpo_train.trainer.reward import load_reward_fn, score_one
from tests.helpers.cli import run_cli
from tests.helpers.tiny_setup import tiny_overrides, write_data, write_tiny_model


def score(fn):
    return score_one(fn, 3, "sfpo/addition", "1+1=", "2", "2", None)


def reward_file(tmp_path, body: str) -> str:
    path = tmp_path / "reward.py"
    path.write_text(body)
    return str(path)


@pytest.mark.parametrize("code", [0, 1, None], ids=["exit-0", "exit-1", "exit-none"])
def test_a_reward_that_calls_sys_exit_is_named_with_the_sample(tmp_path, code):
    fn = load_reward_fn(
        reward_file(
            tmp_path,
            f"import sys\ndef compute_score(data_source, solution_str, ground_truth, extra_info=None):\n"
            f"    sys.exit({code})\n",
        ),
        "compute_score",
    )
    with pytest.raises(ValueError) as info:
        score(fn)
    message = str(info.value)
    assert message.startswith("the reward function raised on sample 3 (data_source='sfpo/addition', prompt='1+1='")
    assert f"function=compute_score in {tmp_path / 'reward.py'})" in message
    assert message.endswith(f"SystemExit: {'' if code is None else code}")


def test_a_reward_module_that_exits_at_import_is_refused(tmp_path):
    path = reward_file(tmp_path, "import sys\nsys.exit(0)\n")
    with pytest.raises(ValueError, match=r"custom_reward_function.path='.*reward.py' failed to import: SystemExit: 0"):
        load_reward_fn(path, "compute_score")


@pytest.mark.parametrize(
    "value, shown",
    [
        pytest.param(10**400, "an integer of 1329 bits", id="int-too-big-for-float"),
        pytest.param(-(10**400), "an integer of 1329 bits", id="negative-int-too-big"),
        pytest.param(Fraction(10**400, 3), "Fraction(", id="fraction-too-big"),
        pytest.param(float("nan"), "nan", id="nan"),
        pytest.param(float("inf"), "inf", id="inf"),
        pytest.param(1j, "1j", id="complex"),
        pytest.param(True, "True", id="bool"),
        pytest.param({"score": 10**400}, "an integer of 1329 bits", id="dict-score-too-big"),
    ],
)
def test_non_finite_or_non_real_rewards_are_refused_naming_the_function(value, shown):
    def compute_score(**_):
        return value

    with pytest.raises(ValueError) as info:
        score(compute_score)
    message = str(info.value)
    assert message.startswith("the reward function must return a finite number, got ")
    assert shown in message and "on sample 3 (data_source='sfpo/addition'" in message
    assert (
        "function=test_non_finite_or_non_real_rewards_are_refused_naming_the_function.<locals>.compute_score in "
        in message
    )
    assert "\n" not in message and len(message) < 600


def test_an_extra_entry_too_big_for_a_float_is_left_out():
    def compute_score(**_):
        return {"score": 1, "acc": 10**400, "len": 3}

    assert score(compute_score) == (1.0, {"len": 3.0})
    assert math.isfinite(score(lambda **_: Fraction(1, 3))[0])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("tiny")
    return tiny_overrides(write_tiny_model(str(root / "model")), write_data(str(root)))


@pytest.mark.parametrize(
    "body, expected",
    [
        pytest.param(
            "import sys\ndef compute_score(data_source, solution_str, ground_truth, extra_info=None):\n"
            "    sys.exit(0)\n",
            "the reward function raised on sample 0 (data_source='sfpo/addition'",
            id="sys-exit-0",
        ),
        pytest.param("import sys\nsys.exit(0)\n", "failed to import: SystemExit: 0", id="exit-at-import"),
        pytest.param(
            "def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n    return 10**400\n",
            "the reward function must return a finite number, got an integer of 1329 bits on sample 0",
            id="int-too-big",
        ),
    ],
)
def test_sfpo_train_ends_non_zero_with_one_line(tiny, tmp_path, body, expected):
    out = run_cli(
        "train",
        "--preset",
        "smoke",
        *tiny,
        f"custom_reward_function.path={reward_file(tmp_path, body)}",
        f"trainer.default_local_dir={tmp_path}",
        "trainer.experiment_name=run",
        "trainer.progress_bar=false",
        "trainer.total_training_steps=1",
        "trainer.val_before_train=false",
    )
    assert out.returncode == 2, (out.returncode, out.stderr)
    errors = [line for line in out.stderr.splitlines() if line.startswith("sfpo train: error:")]
    assert len(errors) == 1 and expected in errors[0], out.stderr
    assert "Traceback" not in out.stderr
