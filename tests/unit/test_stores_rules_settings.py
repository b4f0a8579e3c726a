"""The memory store's byte bound, rule and setting validation."""

from __future__ import annotations

import time

import pytest

from proxy.errors import ConfigError
from proxy.models import CachedResponse
from proxy.rules import Rules, load_rules, parse_rules
from proxy.settings import Settings
from proxy.stores import MemoryStore, open_store


def entry(n: int) -> CachedResponse:
    return CachedResponse(200, (), b"x" * n, time.time())


async def test_memory_store_stays_under_its_byte_bound():
    """The LRU evicts the least recently used entries to stay under max_bytes."""
    store = MemoryStore(max_bytes=10_000)
    for i in range(50):
        await store.set(f"k{i}", entry(1000), 60)
        assert store.bytes <= 10_000
    assert len(store) < 10
    await store.get("k45")  # touch: survives the next evictions
    for i in range(50, 55):
        await store.set(f"k{i}", entry(1000), 60)
    assert await store.get("k45") is not None and await store.get("k40") is None
    await store.set("huge", entry(20_000), 60)  # larger than the bound: not kept
    assert await store.get("huge") is None and store.bytes <= 10_000


async def test_memory_store_ttl():
    """Expired entries are gone."""
    store = MemoryStore()
    await store.set("k", entry(1), -1)
    assert await store.get("k") is None and store.bytes == 0


def test_shipped_rules_load_and_match():
    """The shipped rules cache the documented routes; others pass through."""
    rules = load_rules(None)
    for route in (
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/responses",
        "/v1/embeddings",
        "/v1/images/generations",
        "/v1/images/edits",
        "/v1/images/variations",
        "/v1/audio/speech",
        "/v1/moderations",
    ):
        assert rules.match("POST", route, "gpt-4o") is not None, route
    assert rules.match("GET", "/v1/models", None) is None
    assert rules.match("POST", "/v1/files", None) is None
    assert rules.match("POST", "/openai/deployments/d1/chat/completions", "d1") is not None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[rule]]\nroute = "v1/x"', "must be a path"),
        ('[[rule]]\nroute = "/v1/x"\nttl_s = -1', "'ttl_s' must be a number >= 0"),
        ('[[rule]]\nroute = "/v1/x"\nreplay = "slow"', "'replay'"),
        ('[[rule]]\nroute = "/v1/x"\ncolor = 1', "unknown field"),
        ('[rule]\nroute = "/v1/x"', "use [[rule]]"),
        ("[[rule]\n", "not valid TOML"),
        ('[[rule]]\nroute = "/v1/x"\nenabled = "yes"', "true or false"),
    ],
)
def test_bad_rules_stop_the_boot_with_one_clear_line(text, message):
    """A bad rule raises ConfigError naming the file, the rule and what is wrong."""
    with pytest.raises(ConfigError, match=r"rules f\.toml") as info:
        parse_rules(text, "f.toml")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_model_globs_and_first_match_wins():
    """A model-specific rule listed first wins over the route's general rule."""
    rules = Rules(
        parse_rules(
            '[[rule]]\nroute = "/v1/chat/*"\nmodels = ["gpt-4o-mini*"]\nttl_s = 5\n'
            '[[rule]]\nroute = "/v1/chat/*"\nttl_s = 9\n',
            "t",
        )
    )
    ttls = [
        getattr(rules.match("POST", "/v1/chat/completions", m), "ttl_s", None)
        for m in ("gpt-4o-mini-2024", "gpt-4o", None)
    ]
    assert ttls == [5, 9, 9]


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
def test_bad_settings_name_the_setting(argv, env, message):
    """A bad flag or variable raises ConfigError naming both forms of the setting."""
    with pytest.raises(ConfigError, match=message):
        Settings.from_args(argv, env)


def test_env_twins_and_flags():
    """Every flag has a PROXY_* twin; the flag wins over the variable."""
    s = Settings.from_args(["--port", "9000"], {"PROXY_PORT": "8000", "PROXY_CACHE": "memory://"})
    assert s.port == 9000 and s.cache == "memory://"


def test_open_store_urls(tmp_path):
    """Store URLs map to their backends; an empty one is SQLite in the data dir."""
    assert open_store("memory://?max_mb=1", tmp_path).name == "memory"
    assert open_store("", tmp_path).name == "sqlite"
    assert open_store(f"sqlite:///{tmp_path}/c.db", tmp_path).name == "sqlite"
    with pytest.raises(ConfigError, match="max_mb"):
        open_store("memory://?max_mb=lots", tmp_path)


def test_stats_labels_stay_bounded():
    """100 distinct model names give at most 64 model labels plus "other"; totals add up."""
    from proxy.stats import MAX_MODELS, Stats

    stats = Stats()
    for i in range(100):
        line = {
            "cache": "hit",
            "rule": "/v1/x",
            "model": f"m{i}",
            "status": 200,
            "bytes": 1,
            "tokens_in": 1,
            "tokens_out": 2,
            "saved_usd": 0.5,
            "saved_ms": 3.0,
        }
        stats.record(dict(line), 0.001)
        stats.record(dict(line), 0.001)
    models = {model for _route, model, _cache in stats.cells}
    assert len(models) == MAX_MODELS + 1 and "other" in models
    snap = stats.snapshot()
    assert snap["requests"] == 200 and snap["hits"] == 200 and snap["saved_usd"] == 100.0
    assert snap["tokens"]["out_saved"] == 400 and snap["last_hour"]["served_from_cache"] == 200


def test_unknown_flag_is_one_line():
    """An unknown flag stops start-up with one line, not argparse's usage block."""
    with pytest.raises(ConfigError, match="unrecognized arguments: --bogus") as info:
        Settings.from_args(["--bogus"], {})
    assert "\n" not in str(info.value)


def test_rule_memos_never_keep_a_clients_long_strings():
    """A megabyte model name or path is matched but not memoised (the memos stay small)."""
    from proxy.rules import Rules, parse_rules

    rules = Rules(parse_rules('[[rule]]\nroute = "/v1/*"\nmodels = ["gpt-*"]\n', "t"))
    for i in range(50):
        assert rules.match("POST", "/v1/chat", f"gpt-{i}" + "m" * 100_000) is not None
        assert rules.has_route("POST", "/v1/" + "p" * 100_000 + str(i))
    assert rules.match("POST", "/v1/chat", "gpt-4o") is not None
    kept = list(rules._match_cache) + list(rules._route_cache)
    assert kept and all(len(str(k)) < 1024 for k in kept)
