"""The README stays true to the code."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from proxy.settings import Settings, _env, _flag

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_setting_is_in_the_readme_table() -> None:
    """Each flag and its PROXY_* twin has a row in the settings table."""
    for f in fields(Settings):
        assert f"| `{_flag(f.name)}` | `{_env(f.name)}` |" in README, f.name


def test_the_two_commands_are_there() -> None:
    """The run and test commands the README promises are the ones CI uses."""
    assert "pip install -e . && python -m proxy\n" in README
    assert "./scripts/test\n" in README
    ci = (Path(__file__).resolve().parents[2] / ".ci" / "run").read_text()
    assert "./scripts/test" in ci


def test_the_base_url_table_is_what_the_proxy_sends() -> None:
    """Each row of the README's base URL table: the request the client sends, through
    `--upstream`, reaches exactly the path (and query) the row says."""
    from urllib.parse import urlsplit

    from proxy.intake import route_of
    from proxy.upstream import Upstream

    rows = [
        [cell.strip().strip("`") for cell in line.strip("|").split("|")]
        for line in README.splitlines()
        if line.startswith("| ") and "`--upstream`" not in line and "/chat/completions" in line
    ]
    assert len(rows) == 9
    for _client, sends, upstream, expected in rows:
        path, _, query = sends.partition("?")
        _route, upstream_path = route_of(path)
        up = Upstream(upstream, connect_timeout_s=1, read_timeout_s=1, environ={})
        assert up.path_for(upstream_path + ("?" + query if query else "")) == expected, sends
        assert urlsplit(up.url_for("/v1/x")).netloc == urlsplit(upstream).netloc
