"""The package as a user meets it: imports, the README's two commands, the ``sfpo`` CLI."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from sfpo_train import cli

ROOT = Path(__file__).resolve().parents[2]


def test_imports_without_gpu_only_packages():
    code = "import sys, sfpo_kernels, sfpo_train.cli; print(sorted(m for m in ('verl', 'vllm') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_top_level_help_imports_no_subcommand():
    """``sfpo --help`` answers without importing the kernels, pandas, transformers or any subcommand's module."""
    code = (
        "import sys\nfrom sfpo_train import cli\ntry:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = ('triton', 'pandas', 'transformers', 'matplotlib', 'sfpo_kernels', 'sfpo_train.cli.demo', "
        "'sfpo_train.cli.train', 'sfpo_train.cli.report', 'sfpo_train.cli.compare')\n"
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
    assert "compare" in out and "train" in out  # the subcommands are listed all the same


def test_readme_has_exactly_the_two_setup_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    commands = {}
    for marker in ("main-command", "test-command"):
        match = re.search(rf"<!-- {marker} -->\n```bash\n(.+)\n```", readme)
        assert match, f"README lacks the {marker} block"
        commands[marker] = match.group(1)
    assert commands["main-command"].startswith("pip install") and commands["main-command"].endswith("sfpo train")
    assert commands["test-command"].startswith("pip install") and "pytest" in commands["test-command"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "<!-- test-command -->" in ci, ".ci/run must read the test command from the README"


def test_cli_help_lists_demo(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    assert "demo" in capsys.readouterr().out


def test_cli_without_command_prints_help_and_fails(capsys):
    assert cli.main([]) == 2
    assert "usage: sfpo" in capsys.readouterr().out


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_demo_runs_and_checks_pass(backend, capsys):
    status = cli.main(
        [
            "demo",
            "--hidden",
            "16",
            "--layers",
            "1",
            "--vocab",
            "32",
            "--backend",
            backend,
            "--dtype",
            "bf16",
            "--sfpo-steps",
            "1",
        ]
    )
    out = capsys.readouterr().out
    assert status == 0, out
    assert f"[{backend:>6}]" in out and "0 elements differ" in out and "alpha 0/1 exact: True" in out
    assert f"[{backend:>6}] grpo_loss" in out and "SFPO step 0: alpha 0.80" in out


@pytest.mark.parametrize(
    "argv,pattern",
    [
        (["demo", "--alpha", "1.5"], r"--alpha must be in \[0, 1\], got 1.5"),
        (["demo", "--hidden", "30"], r"--hidden must be a multiple of 4"),
        (["demo", "--inner-steps", "-1"], r"--inner-steps must be >= 0, got -1"),
        (["demo", "--device", "tpu"], r"--device must be cpu or cuda\[:N\], got 'tpu'"),
        (["demo", "--layers", "0"], r"--layers must be positive, got 0"),
    ],
)
def test_demo_rejects_bad_options(argv, pattern, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert re.search(pattern, capsys.readouterr().err)


def test_ci_requires_the_extras_the_test_command_installs(monkeypatch):
    """CI cannot pass with the verl tests skipped: a package SFPO_REQUIRE names fails when missing."""
    from tests.helpers.optional import import_or_skip

    ci = (ROOT / ".ci" / "run").read_text()
    required = re.search(r"export SFPO_REQUIRE=(\S+)", ci).group(1).split(",")
    assert {"verl", "hypothesis"} <= set(required)
    assert "verl" in re.search(r"<!-- test-command -->\n```bash\n(.+)\n```", (ROOT / "README.md").read_text()).group(1)
    monkeypatch.setenv("SFPO_REQUIRE", "verl,sfpo_no_such_package")
    with pytest.raises(ModuleNotFoundError):
        import_or_skip("sfpo_no_such_package")
    monkeypatch.setenv("SFPO_REQUIRE", "")
    with pytest.raises(pytest.skip.Exception):
        import_or_skip("sfpo_no_such_package")
