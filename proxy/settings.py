"""Settings: one frozen dataclass, built once from flags and their PROXY_* environment twins."""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

import platformdirs

from proxy.errors import ConfigError


def _default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("openai-cache-proxy", appauthor=False))


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the proxy is told at start-up. Every field is a flag and a PROXY_* variable."""

    host: str = "127.0.0.1"
    """Listen address."""
    port: int = 8080
    """Listen port."""
    upstream: str = "https://api.openai.com"
    """The OpenAI-compatible API to front (scheme://host[:port][/prefix])."""
    data_dir: Path = field(default_factory=_default_data_dir)
    """Where the embedded store, the local images and the key secret live."""
    cache: str = ""
    """Store URL: memory://[?max_mb=N], sqlite:///path.db[?max_mb=N], redis://... Empty: SQLite
    in data_dir (capped at 1024 MB)."""
    rules: Path | None = None
    """A TOML file or a folder of them. None: the shipped rules/."""
    hot_cache_mb: float = 64.0
    """In-process hot tier in front of SQLite or Redis (0 turns it off)."""
    hot_cache_ttl_s: float = 5.0
    """Longest time a hot entry is served without asking the shared store again."""
    breaker_s: float = 5.0
    """After a store failure, how long the store is left alone (pass-through meanwhile)."""
    lease_s: float = 5.0
    """With Redis: how long a leader's lease lasts without renewal (a dead leader's flight is
    taken over after about this long)."""
    max_body_mb: float = 64.0
    """Largest request body accepted; a larger one gets 413 before anything goes upstream."""
    log_format: str = "json"
    """json (one line per request) or console."""
    workers: int = 1
    """Worker processes on one listening socket bound by a supervising parent (a worker that
    dies is replaced)."""
    secret: str = ""
    """HMAC secret for cache keys and tenant hashes. Empty: the one kept in the store, shared by
    every instance on it (the first puts its data_dir's there). Given: never stored; an
    instance whose secret differs from the store's entries stops with one line."""
    upstream_connect_timeout_s: float = 10.0
    """Connect timeout to the upstream; past it the client gets 502."""
    upstream_read_timeout_s: float = 600.0
    """Longest time without progress while writing a request to or reading an answer from the
    upstream; past it the client gets 504."""
    auth_recheck_s: float = 3600.0
    """A credential served from the cache is re-checked upstream (GET /v1/models) when it was
    last seen accepted longer ago than this, so a revoked key stops getting cached answers
    within this window. 0 turns the check off."""
    max_record_mb: float = 32.0
    """An answer (streamed or not) larger than this is relayed whole but not stored."""
    detached_max_s: float = 600.0
    """How long an upstream answer is still read to the end after every client hung up."""
    idempotency_ttl_s: float = 86400.0
    """How long an answer given to an Idempotency-Key is kept."""
    images: str = ""
    """Image store: file:///dir or s3://bucket/prefix. Empty: file:// under data_dir."""
    public_url: str = ""
    """Base URL for links to images the proxy serves. Empty: from each request's Host."""
    images_public_url: str = ""
    """Base URL of a public bucket or custom domain for S3/R2 links. Empty: presigned URLs."""
    s3_endpoint_url: str = ""
    """S3-compatible endpoint (R2). Empty: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else AWS."""
    image_source_hosts: str = ""
    """Comma-separated hosts images may be fetched from. Empty: OpenAI's image blob host."""
    image_max_mb: float = 50.0
    """Largest image fetched for rehosting."""
    image_timeout_s: float = 15.0
    """Longest time rehosting one answer's images may take, as a whole (downloads and
    uploads); past it the client gets the original answer and nothing is stored."""
    header_timeout_s: float = 30.0
    """A connection whose request head is not complete this long after its first byte (or
    after it opened) is closed."""
    keepalive_timeout_s: float = 75.0
    """Idle keep-alive connections are closed after this long."""
    write_timeout_s: float = 60.0
    """A client that takes no bytes of its answer for this long is dropped."""
    upstream_ca_file: str = ""
    """A PEM bundle of CA certificates to trust for the upstream (a private CA). Empty: the
    system store (and SSL_CERT_FILE)."""
    semantic_timeout_s: float = 2.0
    """Longest wait for the embedding of a semantic lookup (rules with `semantic`); past it,
    or on any failure, the request is a plain MISS."""
    semantic_max_entries: int = 10000
    """Vectors kept per semantic partition (the newest)."""
    semantic_memory_mb: float = 256.0
    """Vectors each process keeps in memory for searching, over all partitions."""
    semantic_embeddings_url: str = ""
    """An OpenAI-compatible embeddings server for the semantic lookups (a local model server,
    e.g. http://127.0.0.1:8000/v1): no cost per lookup, and the compared text stays on your
    network. Empty: the upstream, with the caller's own credential."""
    semantic_verify_timeout_s: float = 10.0
    """Longest wait for the judge of `semantic_verify = "llm"`; past it, the candidate is not
    served (a MISS)."""
    semantic_embeddings_key: str = ""
    """The bearer token sent to --semantic-embeddings-url (the caller's key never is)."""
    admin_token: str = ""
    """Opens /_proxy/stats, /_proxy/metrics, /_proxy/dashboard and /_proxy/purge to clients
    that send it as `Authorization: Bearer <token>`. Empty: they answer loopback clients only."""

    @classmethod
    def from_args(
        cls,
        argv: Sequence[str] | None = None,
        environ: Mapping[str, str] = os.environ,
        **parser_kw: Any,
    ) -> Settings:
        """Parse flags; each flag's default comes from its PROXY_* twin, then the built-in one.
        `parser_kw` (prog, description, epilog, only, extra) serve subcommands (see parse)."""
        return cls.parse(argv, environ, **parser_kw)[0]

    @classmethod
    def parse(
        cls,
        argv: Sequence[str] | None = None,
        environ: Mapping[str, str] = os.environ,
        *,
        only: Sequence[str] | None = None,
        extra: Callable[[argparse.ArgumentParser], None] | None = None,
        **parser_kw: Any,
    ) -> tuple[Settings, argparse.Namespace]:
        """Settings and the parsed flags. A subcommand shows and takes `only` the settings it
        uses as flags (the others still come from their PROXY_* twins) and adds its own
        options with `extra`; their values are in the namespace."""
        parser = build_parser(environ, only=only, **parser_kw)
        if extra is not None:
            extra(parser)
        ns = parser.parse_args(argv)
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = getattr(ns, f.name, None)
            if raw is None and only is not None and f.name not in only:
                raw = environ.get(_env(f.name))
            if raw is None:
                continue
            values[f.name] = _convert(f.name, raw)
        settings = cls(**values)
        settings.validate()
        return settings, ns

    def validate(self) -> None:
        """Raise ConfigError naming the first setting that is wrong."""
        if not 0 < self.port < 65536:
            raise ConfigError(f"--port / PROXY_PORT: {self.port} is not a port number")
        up = urlsplit(self.upstream)
        if up.scheme not in ("http", "https") or not up.netloc:
            raise ConfigError(
                f"--upstream / PROXY_UPSTREAM: {self.upstream!r} is not an http(s) URL"
            )
        if self.cache:
            scheme = urlsplit(self.cache).scheme
            if scheme not in ("memory", "sqlite", "redis", "rediss", "redis+cluster"):
                raise ConfigError(
                    f"--cache / PROXY_CACHE: {self.cache!r} is not memory://, sqlite:///path, "
                    "redis:// or rediss://"
                )
        if self.images and urlsplit(self.images).scheme not in ("file", "s3"):
            raise ConfigError(
                f"--images / PROXY_IMAGES: {self.images!r} is not file:///dir or s3://bucket/prefix"
            )
        for name in (
            "public_url",
            "images_public_url",
            "s3_endpoint_url",
            "semantic_embeddings_url",
        ):
            value = getattr(self, name)
            if value and urlsplit(value).scheme not in ("http", "https"):
                raise ConfigError(f"{_flag(name)} / {_env(name)}: {value!r} is not an http(s) URL")
        for name in POSITIVE:
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{_flag(name)} / {_env(name)}: {value:g} must be above 0")
        for name in ZERO_IS_OFF:
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(
                    f"{_flag(name)} / {_env(name)}: {value:g} must be 0 (off) or more"
                )
        if self.upstream_ca_file and not Path(self.upstream_ca_file).is_file():
            raise ConfigError(
                f"--upstream-ca-file / PROXY_UPSTREAM_CA_FILE: {self.upstream_ca_file} "
                "is not a file"
            )
        if self.log_format not in ("json", "console"):
            raise ConfigError(
                f"--log-format / PROXY_LOG_FORMAT: {self.log_format!r} is not json or console"
            )
        if self.workers < 1:
            raise ConfigError("--workers / PROXY_WORKERS: must be 1 or more")
        if self.rules is not None and not self.rules.exists():
            raise ConfigError(f"--rules / PROXY_RULES: {self.rules} does not exist")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)


POSITIVE = (
    "max_body_mb",
    "hot_cache_ttl_s",
    "breaker_s",
    "lease_s",
    "upstream_connect_timeout_s",
    "upstream_read_timeout_s",
    "max_record_mb",
    "detached_max_s",
    "idempotency_ttl_s",
    "image_max_mb",
    "image_timeout_s",
    "header_timeout_s",
    "keepalive_timeout_s",
    "write_timeout_s",
    "semantic_timeout_s",
    "semantic_max_entries",
    "semantic_memory_mb",
    "semantic_verify_timeout_s",
)
"""Sizes and times that make no sense at 0 or below: start-up stops naming the setting."""
ZERO_IS_OFF = ("hot_cache_mb", "auth_recheck_s")
"""Sizes and times where 0 turns the feature off; below 0 stops start-up."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _env(name: str) -> str:
    return "PROXY_" + name.upper()


_CONVERTERS: dict[str, Callable[[str], Any]] = {
    "port": int,
    "workers": int,
    "max_body_mb": float,
    "hot_cache_mb": float,
    "lease_s": float,
    "breaker_s": float,
    "hot_cache_ttl_s": float,
    "upstream_connect_timeout_s": float,
    "upstream_read_timeout_s": float,
    "max_record_mb": float,
    "auth_recheck_s": float,
    "detached_max_s": float,
    "idempotency_ttl_s": float,
    "image_max_mb": float,
    "image_timeout_s": float,
    "header_timeout_s": float,
    "keepalive_timeout_s": float,
    "write_timeout_s": float,
    "semantic_timeout_s": float,
    "semantic_max_entries": int,
    "semantic_memory_mb": float,
    "semantic_verify_timeout_s": float,
    "data_dir": lambda s: Path(s).expanduser(),
    "rules": lambda s: Path(s).expanduser(),
}


def _convert(name: str, raw: str) -> Any:
    conv = _CONVERTERS.get(name, str)
    try:
        return conv(raw)
    except ValueError:
        raise ConfigError(f"{_flag(name)} / {_env(name)}: {raw!r} is not a valid value") from None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line naming what is wrong (not argparse's usage block)."""
        raise ConfigError(f"{message} (see {self.prog} --help)")


DESCRIPTION = "A transparent caching proxy for the OpenAI API."
SUBCOMMANDS = """subcommands (each has its own --help):
  demo [--serve [flags]]       the proxy doing its job on a fake upstream, offline
  fake-upstream [--port N]     the fake OpenAI API the tests and the demo use (no key needed)
  report [FILE ...|-]          hit ratios, tokens and dollars from request.done lines
  images backfill [flags]      rehost images in answers cached before rehosting was on
  purge --namespace|--tenant|--model|--route ... [--cache URL] [--data-dir DIR]
                               delete cached answers from the configured store
  healthcheck [--data-dir DIR] exit 0 if the proxy on this machine answers its health route
  semantic calibrate --model NAME [--pairs FILE] [--max-wrong 0.05]
                               the semantic threshold for an embeddings model

Every flag has a PROXY_* environment twin (shown with each flag)."""


def _shown_default(f: Any) -> str:
    if f.default_factory is not MISSING:
        return str(f.default_factory())
    if f.default in ("", None):
        return "none"
    return str(f.default)


def build_parser(
    environ: Mapping[str, str] = os.environ,
    *,
    prog: str = "python -m proxy",
    description: str = DESCRIPTION,
    epilog: str | None = SUBCOMMANDS,
    only: Sequence[str] | None = None,
) -> argparse.ArgumentParser:
    """The argument parser; every Settings field (or `only` those) is a flag whose default is
    its env twin."""
    parser = _Parser(
        prog=prog,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    docs = field_docs()
    for f in fields(Settings):
        if only is not None and f.name not in only:
            continue
        doc = " ".join(docs.get(f.name, "").split()).replace("%", "%%")
        shown = _shown_default(f).replace("%", "%%")
        parser.add_argument(
            _flag(f.name),
            dest=f.name,
            default=environ.get(_env(f.name)),
            help=f"{doc} [default: {shown}; env {_env(f.name)}]",
        )
    return parser


@functools.cache
def field_docs() -> dict[str, str]:
    """Each field's docstring, read from the source the first time --help (or the README
    check) asks, so --help says what the dataclass says; never at import."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(Settings))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
        ):
            docs[node.target.id] = str(nxt.value.value)
    return docs
