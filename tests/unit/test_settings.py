"""settings.py on its own: flags, env twins, validation."""

from __future__ import annotations

import pytest

from proxy.errors import ConfigError
from proxy.settings import Settings


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--port", "0"], {}, "--port / PROXY_PORT"),
        ([], {"PROXY_PORT": "http"}, "--port / PROXY_PORT"),
        (["--cache", "mongo://x"], {}, "--cache / PROXY_CACHE"),
        (["--upstream", "ftp://x"], {}, "--upstream / PROXY_UPSTREAM"),
        (["--log-format", "xml"], {}, "--log-format / PROXY_LOG_FORMAT"),
        (["--images", "gs://b"], {}, "--images / PROXY_IMAGES"),
        (["--max-body-mb", "0"], {}, "--max-body-mb / PROXY_MAX_BODY_MB"),
        (["--rules", "/nonexistent/rules"], {}, "--rules / PROXY_RULES"),
    ],
)
def test_bad_settings_name_the_setting(argv: list[str], env: dict[str, str], message: str) -> None:
    """A bad flag or variable raises ConfigError naming both forms of the setting."""
    with pytest.raises(ConfigError, match=message):
        Settings.from_args(argv, env)


def test_env_twins_and_flags() -> None:
    """Every flag has a PROXY_* twin; the flag wins over the variable."""
    s = Settings.from_args(["--port", "9000"], {"PROXY_PORT": "8000", "PROXY_CACHE": "memory://"})
    assert s.port == 9000 and s.cache == "memory://"


def test_unknown_flag_is_one_line() -> None:
    """An unknown flag stops start-up with one line, not argparse's usage block."""
    with pytest.raises(ConfigError, match="unrecognized arguments: --bogus") as info:
        Settings.from_args(["--bogus"], {})
    assert "\n" not in str(info.value)
