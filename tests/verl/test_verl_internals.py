"""What every verl process loads from sfpo, and the one module that touches verl's internals.

``sfpo_train.verl.plugin`` is loaded by verl's ``verl.plugins`` entry point in
every process of every verl job wherever sfpo is installed: it must not bring the
CPU runtime (platform, engine, rollout server) or the standalone trainer along.
"""

import os
import subprocess
import sys
import warnings

import pytest

from tests.helpers.optional import import_or_skip

import_or_skip("verl")

from sfpo_train.verl import verl_internals

NOT_LOADED = ("sfpo_train.verl.cpu_runtime", "sfpo_train.verl.cpu", "sfpo_train.verl.hf_rollout", "sfpo_train.trainer")


@pytest.mark.parametrize("first_import", ["sfpo_train.verl.plugin", "verl"])
def test_the_plugin_loads_neither_the_cpu_runtime_nor_the_trainer(first_import):
    code = (
        f"import sys, {first_import}\n"
        "assert 'sfpo_train.verl.plugin' in sys.modules, 'the entry point did not load the plugin'\n"
        f"print(sorted(m for m in sys.modules if m.startswith({NOT_LOADED!r})))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("VERL_USE_EXTERNAL_MODULES", "VERL_PLATFORM")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]", out.stdout


@pytest.fixture
def fresh_check(monkeypatch):
    monkeypatch.setattr(verl_internals, "_warned", False)
    return monkeypatch


def test_another_verl_version_warns_once_naming_both(fresh_check):
    fresh_check.setattr(verl_internals, "installed_version", "0.10.0")
    with pytest.warns(RuntimeWarning, match=r"written for verl 0\.9\.1, but verl 0\.10\.0 is installed") as seen:
        verl_internals.check_verl_version()
        verl_internals.check_verl_version()
        verl_internals.current_platform()
    assert len([w for w in seen if issubclass(w.category, RuntimeWarning)]) == 1


def test_the_version_it_was_written_for_does_not_warn(fresh_check):
    fresh_check.setattr(verl_internals, "installed_version", verl_internals.VERL_VERSION)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        verl_internals.check_verl_version()


def test_the_installed_verl_is_the_one_written_for():
    import verl

    assert verl.__version__ == verl_internals.VERL_VERSION  # the pin in pyproject.toml's verl extra
