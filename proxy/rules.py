"""Declarative cache rules: which routes are cached, for how long, and what the key ignores.

Rules are read from TOML (a file or a folder of `*.toml`, in name order) and validated into
frozen `Rule`s at start-up, so one bad rule stops the boot. The first rule whose route, method
and model globs all match a request decides; no match means a plain pass-through.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal

from proxy.errors import ConfigError

MEMO_KEY_MAX = 512
"""Longest route + model a match is memoised for: the memo holds at most 4096 x this."""
DEFAULT_IGNORE: tuple[str, ...] = (
    "user",
    "metadata",
    "safety_identifier",
    "prompt_cache_key",
    "prompt_cache_retention",
    "service_tier",
    "stream_options.include_obfuscation",
)


@dataclass(frozen=True, slots=True)
class Rule:
    """What to do with requests to one route (and model glob)."""

    route: str
    """Path glob with the /v1 prefix: "/v1/chat/completions", "/openai/deployments/*/embeddings"."""
    name: str = ""
    """Shown in logs; defaults to the route."""
    methods: tuple[str, ...] = ("POST",)
    models: tuple[str, ...] = ("*",)
    """Model globs; a request whose body names no model matches only "*"."""
    enabled: bool = True
    """False: requests matching this rule pass through untouched (no cache, no coalescing)."""
    store: bool = True
    """Store answers. False keeps coalescing (and debounce) without a cache."""
    coalesce: bool = True
    """Identical requests in flight share one upstream call."""
    ttl_s: float = 7 * 86400.0
    ignore_fields: tuple[str, ...] = DEFAULT_IGNORE
    """Body fields (dotted paths) left out of the key; every other field is keyed."""
    never_if: tuple[str, ...] = ("background",)
    """Body fields that, when truthy, make the request a plain pass-through (side effects)."""
    debounce_s: float = 0.0
    """A just-finished answer is reused by identical requests for this long, even unstored."""
    lock_timeout_s: float = 30.0
    """How long a duplicate waits for the leader's first byte before going upstream itself."""
    replay: Literal["fast", "paced"] = "fast"
    """How a stored stream is replayed: as fast as the client reads, or at the recorded pace."""
    replay_speed: float = 1.0
    """With replay = "paced": 2.0 replays twice as fast as recorded."""
    rehost_images: bool = True
    """Copy image URLs in the answer to the image store and rewrite them (image routes)."""
    stale_if_error_s: float = 0.0
    """An answer past its ttl_s is kept this much longer and served (STALE) only when the
    upstream fails for its request: 429, 500, 502, 503, 504, unreachable, timed out (RFC 5861)."""

    semantic: Literal["off", "shadow", "on"] = "off"
    """Chat Completions and Responses: on an exact miss, look for a cached answer to a request
    that differs only in the wording of its last user message ("on" serves it; "shadow" only
    logs what it would have served). See proxy/semantic.py and proxy/vectors.py."""
    semantic_threshold: float = 0.95
    """Least cosine similarity of the two last user messages' embeddings for a semantic HIT."""
    semantic_model: str = "text-embedding-3-small"
    """The embeddings model the compared texts are embedded with."""
    semantic_embeddings_url: str = ""
    """An OpenAI-compatible embeddings server for this rule's lookups (a local model server),
    instead of --semantic-embeddings-url or the upstream; its key is
    --semantic-embeddings-key (a key is never written in a rules file)."""
    semantic_verify: Literal["off", "llm"] = "off"
    """"llm": a candidate that clears the threshold and the guards is served only once a
    small judge model (`semantic_verify_model`, through the upstream with the caller's key)
    says the cached answer answers this request too; verdicts are kept per pair."""
    semantic_verify_model: str = "gpt-4o-mini"
    """The judge model of `semantic_verify = "llm"`."""
    caller_keys: bool = True
    """False: X-Cache-Key, X-Cache-Ignore-Fields and their aliases are not honoured here
    (requests are keyed by their body whatever the caller sends); see caller_keys.py."""
    prompt_cache_key: Literal["off", "auto"] = "off"
    """"auto": a request with no `prompt_cache_key` goes upstream with one derived from the
    tenant and its stable prefix (system prompt, instructions, tools), so requests sharing a
    long prefix reach the same provider prompt cache (see prompt_cache.py). Never keyed."""
    embeddings_per_item: bool = True
    """Embeddings: each item of an `input` list is its own entry; a partly cached list sends
    only its missing items upstream (see embeddings.py)."""

    def matches(self, method: str, route: str, model: str | None) -> bool:
        if method not in self.methods or not fnmatchcase(route, self.route):
            return False
        if model is None:
            return "*" in self.models
        return any(fnmatchcase(model, m) for m in self.models)

    @property
    def label(self) -> str:
        """The rule's name in logs, stats and metrics: `name`, else its route."""
        return self.name or self.route


@dataclass(frozen=True, slots=True)
class Rules:
    """The ordered rule list; `match` is the only question the data path asks."""

    rules: tuple[Rule, ...]
    _route_cache: dict[tuple[str, str], bool] = field(default_factory=dict, compare=False)
    _match_cache: dict[tuple[str, str, str | None], Rule | None] = field(
        default_factory=dict, compare=False
    )

    def has_route(self, method: str, route: str) -> bool:
        """Could any rule match this method and route (whatever the model)? Memoised."""
        known = self._route_cache.get((method, route))
        if known is None:
            known = any(method in r.methods and fnmatchcase(route, r.route) for r in self.rules)
            if len(self._route_cache) < 4096 and len(route) <= MEMO_KEY_MAX:
                self._route_cache[(method, route)] = known
        return known

    def match(self, method: str, route: str, model: str | None) -> Rule | None:
        """The first rule that matches; memoised (bounded), as has_route is."""
        key = (method, route, model)
        if key in self._match_cache:
            return self._match_cache[key]
        found = next((r for r in self.rules if r.matches(method, route, model)), None)
        if len(route) + len(model or "") <= MEMO_KEY_MAX:  # a client's megabyte model name
            if len(self._match_cache) >= 4096:  # is matched, never kept
                self._match_cache.clear()
            self._match_cache[key] = found
        return found


_FIELDS = {f.name: f for f in fields(Rule)}
_TUPLES = {"methods", "models", "ignore_fields", "never_if"}
_FLOATS = {
    "ttl_s",
    "debounce_s",
    "lock_timeout_s",
    "replay_speed",
    "stale_if_error_s",
    "semantic_threshold",
}
_BOOLS = {"enabled", "store", "coalesce", "rehost_images", "caller_keys", "embeddings_per_item"}


def _rule_from(raw: dict[str, Any], where: str) -> Rule:
    unknown = set(raw) - set(_FIELDS)
    if unknown:
        raise ConfigError(f"rules {where}: unknown field(s) {', '.join(sorted(unknown))}")
    if "route" not in raw or not isinstance(raw["route"], str) or not raw["route"].startswith("/"):
        raise ConfigError(f"rules {where}: 'route' must be a path starting with /")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _TUPLES:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"rules {where}: {key!r} must be a list of strings")
            value = tuple(v.upper() for v in value) if key == "methods" else tuple(value)
        elif key in _FLOATS:
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ConfigError(f"rules {where}: {key!r} must be a number >= 0")
            value = float(value)
        elif key in _BOOLS:
            if not isinstance(value, bool):
                raise ConfigError(f"rules {where}: {key!r} must be true or false")
        elif key == "replay":
            if value not in ("fast", "paced"):
                raise ConfigError(f'rules {where}: \'replay\' must be "fast" or "paced"')
        elif key == "prompt_cache_key":
            if value not in ("off", "auto"):
                raise ConfigError(f'rules {where}: \'prompt_cache_key\' must be "off" or "auto"')
        elif key == "semantic":
            if value not in ("off", "shadow", "on"):
                raise ConfigError(f'rules {where}: \'semantic\' must be "off", "shadow" or "on"')
        elif key == "semantic_verify":
            if value not in ("off", "llm"):
                raise ConfigError(f'rules {where}: \'semantic_verify\' must be "off" or "llm"')
        elif not isinstance(value, str):
            raise ConfigError(f"rules {where}: {key!r} must be a string")
        values[key] = value
    if not 0 < values.get("semantic_threshold", 0.95) <= 1:
        raise ConfigError(f"rules {where}: 'semantic_threshold' must be above 0 and at most 1")
    if not values.get("semantic_model", "x").strip():
        raise ConfigError(f"rules {where}: 'semantic_model' must name a model")
    url = values.get("semantic_embeddings_url", "")
    if url and not url.startswith(("http://", "https://")):
        raise ConfigError(f"rules {where}: 'semantic_embeddings_url' must be an http(s) URL")
    if not values.get("semantic_verify_model", "x").strip():
        raise ConfigError(f"rules {where}: 'semantic_verify_model' must name a model")
    if values.get("replay_speed", 1.0) <= 0:
        raise ConfigError(f"rules {where}: 'replay_speed' must be above 0")
    return Rule(**values)


def parse_rules(text: str, source: str) -> tuple[Rule, ...]:
    """Parse one TOML document: an optional [defaults] table and [[rule]] entries."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"rules {source}: not valid TOML: {exc}") from None
    unknown = set(doc) - {"defaults", "rule"}
    if unknown:
        raise ConfigError(f"rules {source}: unknown table(s) {', '.join(sorted(unknown))}")
    defaults = doc.get("defaults", {})
    if not isinstance(defaults, dict) or "route" in defaults:
        raise ConfigError(f"rules {source}: [defaults] must be a table without 'route'")
    entries = doc.get("rule", [])
    if not isinstance(entries, list):
        raise ConfigError(f"rules {source}: use [[rule]] for each rule")
    return tuple(
        _rule_from({**defaults, **entry}, f"{source} rule #{i + 1}")
        for i, entry in enumerate(entries)
    )


def default_rules_path() -> Path:
    """The shipped rules: rules/ beside the package in a checkout, else the installed copy."""
    checkout = Path(__file__).resolve().parent.parent / "rules"
    if checkout.is_dir():
        return checkout
    return Path(__file__).resolve().parent / "_rules"


def load_rules(path: Path | None) -> Rules:
    """Load a TOML file or every *.toml in a folder (name order; prices.toml is not a rule file)."""
    path = path or default_rules_path()
    if path.is_dir():
        files = sorted(p for p in path.glob("*.toml") if p.name != "prices.toml")
    else:
        files = [path]
    rules: list[Rule] = []
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"rules {file}: cannot read: {exc.strerror}") from None
        rules.extend(parse_rules(text, str(file)))
    return Rules(tuple(rules))
