"""The README stays true to the code."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from proxy.settings import Settings, _env, _flag

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_setting_is_in_the_readme_table():
    """Each flag and its PROXY_* twin has a row in the settings table."""
    for f in fields(Settings):
        assert f"| `{_flag(f.name)}` | `{_env(f.name)}` |" in README, f.name


def test_the_two_commands_are_there():
    """The run and test commands the README promises are the ones CI uses."""
    assert "pip install -e . && python -m proxy\n" in README
    assert "./scripts/test\n" in README
    ci = (Path(__file__).resolve().parents[2] / ".ci" / "run").read_text()
    assert "./scripts/test" in ci
