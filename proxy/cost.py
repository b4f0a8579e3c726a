"""What an answer cost: tokens and dollars from the answer's own usage and rules/prices.toml.

Pure. Usage comes from the answer (`usage` of a JSON answer, the usage chunk of a chat stream,
`response.completed` of a Responses stream), images are counted per item at the request's
model, size and quality, speech per input character. A model with no price is counted in
tokens and reported unpriced (cost None), never guessed.
"""

from __future__ import annotations

import datetime as dt
import time
import tomllib
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, TypeVar

from proxy.errors import ConfigError
from proxy.prompt_cache import provider_saved


@dataclass(frozen=True, slots=True)
class Cost:
    tokens_in: int
    tokens_out: int
    usd: float | None
    """None: unpriced (the model has no entry in the price table)."""
    tokens_cached: int = 0
    """Input tokens the provider's own prompt cache served (usage ..._details.cached_tokens),
    part of tokens_in, priced at the cached-input price."""
    provider_saved_usd: float | None = None
    """What the provider's cache saved on them: input price less cached-input price."""

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "cost_usd": self.usd,
        }
        if self.tokens_cached:
            out["cached_tokens"] = self.tokens_cached
            out["provider_saved_usd"] = self.provider_saved_usd
        return out


@dataclass(frozen=True, slots=True)
class TokenPrice:
    models: tuple[str, ...]
    since: dt.date
    input: float
    cached_input: float | None
    output: float


@dataclass(frozen=True, slots=True)
class ImagePrice:
    model: str
    size: str
    quality: str
    since: dt.date
    per_image: float


@dataclass(frozen=True, slots=True)
class SpeechPrice:
    models: tuple[str, ...]
    since: dt.date
    per_1m_chars: float


def _date(value: Any, where: str) -> dt.date:
    if isinstance(value, dt.date):
        return value
    try:
        return dt.date.fromisoformat(str(value))
    except ValueError:
        raise ConfigError(f"prices {where}: 'since' must be a date (YYYY-MM-DD)") from None


def _num(raw: dict[str, Any], name: str, where: str, default: float | None = None) -> float:
    value = raw.get(name, default)
    if value is None or isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ConfigError(f"prices {where}: {name!r} must be a number >= 0")
    return float(value)


MEMO_MAX = 4096
TODAY_EVERY_S = 10.0
"""How often the date prices are looked up by is read again (date.today() asks the C
library for the local time zone: a file check per call, on every answer)."""
_day: tuple[float, dt.date] = (-1e9, dt.date.min)


def _today() -> dt.date:
    global _day
    now = time.monotonic()
    if now - _day[0] > TODAY_EVERY_S:
        _day = (now, dt.date.today())
    return _day[1]


@dataclass(frozen=True, slots=True)
class Prices:
    tokens: tuple[TokenPrice, ...] = ()
    images: tuple[ImagePrice, ...] = ()
    speech: tuple[SpeechPrice, ...] = ()
    _memo: dict[tuple[str, dt.date], TokenPrice | None] = field(
        default_factory=dict, compare=False, repr=False
    )
    """token_price per (model, day): every answer asks, and the globs do not change."""

    @classmethod
    def load(cls, path: Path) -> Prices:
        try:
            doc = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return cls()
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"prices {path}: {exc}") from None
        tokens, images, speech = [], [], []
        for i, raw in enumerate(doc.get("tokens", [])):
            where = f"{path} tokens #{i + 1}"
            tokens.append(
                TokenPrice(
                    models=tuple(raw["models"]),
                    since=_date(raw.get("since", "2000-01-01"), where),
                    input=_num(raw, "input", where),
                    cached_input=(
                        _num(raw, "cached_input", where) if "cached_input" in raw else None
                    ),
                    output=_num(raw, "output", where, 0.0),
                )
            )
        for i, raw in enumerate(doc.get("images", [])):
            where = f"{path} images #{i + 1}"
            images.append(
                ImagePrice(
                    model=str(raw["model"]),
                    size=str(raw.get("size", "*")),
                    quality=str(raw.get("quality", "*")),
                    since=_date(raw.get("since", "2000-01-01"), where),
                    per_image=_num(raw, "per_image", where),
                )
            )
        for i, raw in enumerate(doc.get("speech", [])):
            where = f"{path} speech #{i + 1}"
            speech.append(
                SpeechPrice(
                    models=tuple(raw["models"]),
                    since=_date(raw.get("since", "2000-01-01"), where),
                    per_1m_chars=_num(raw, "per_1m_chars", where),
                )
            )
        return cls(tuple(tokens), tuple(images), tuple(speech))

    def token_price(self, model: str, today: dt.date) -> TokenPrice | None:
        key = (model, today)
        if key in self._memo:
            return self._memo[key]
        price = _most_specific(self.tokens, model, today)
        if len(self._memo) >= MEMO_MAX:
            self._memo.clear()
        self._memo[key] = price
        return price

    def image_price(self, model: str, size: str, quality: str, today: dt.date) -> float | None:
        best: tuple[int, dt.date, float] | None = None
        for p in self.images:
            if p.since > today or not fnmatchcase(model, p.model):
                continue
            if not fnmatchcase(size, p.size) or not fnmatchcase(quality, p.quality):
                continue
            rank = ((p.size != "*") + (p.quality != "*"), p.since, p.per_image)
            if best is None or rank[:2] > best[:2]:
                best = rank
        return best[2] if best else None

    def speech_price(self, model: str, today: dt.date) -> float | None:
        found = _most_specific(self.speech, model, today)
        return found.per_1m_chars if found else None

    def cost(
        self,
        route: str,
        model: str | None,
        usage: dict[str, Any] | None,
        hints: dict[str, Any],
        *,
        today: dt.date | None = None,
        images: int = 0,
    ) -> Cost | None:
        """The cost of one good answer, or None if it carries nothing countable."""
        today = today or _today()
        model = model or ""
        if route.endswith("/audio/speech"):
            chars = int(hints.get("input_chars", 0))
            per = self.speech_price(model, today)
            return Cost(chars, 0, None if per is None else round(chars * per / 1e6, 8))
        if images and not usage:
            size = str(hints.get("size") or "1024x1024")
            quality = str(hints.get("quality") or "standard")
            per_image = self.image_price(model or "dall-e-2", size, quality, today)
            return Cost(0, 0, None if per_image is None else round(images * per_image, 8))
        if not usage:
            return None
        tin = _int(usage, "prompt_tokens", "input_tokens")
        tout = _int(usage, "completion_tokens", "output_tokens")
        details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details") or {}
        cached = _int(details, "cached_tokens") if isinstance(details, dict) else 0
        cached = max(0, min(cached, tin))
        price = self.token_price(model, today)
        if price is None:
            return Cost(tin, tout, None, cached)
        cached_rate = price.cached_input if price.cached_input is not None else price.input
        usd = ((tin - cached) * price.input + cached * cached_rate + tout * price.output) / 1e6
        saved = provider_saved(cached, price.input, cached_rate) if cached else None
        return Cost(tin, tout, round(usd, 8), cached, saved)


P = TypeVar("P", TokenPrice, SpeechPrice)


def _most_specific(prices: tuple[P, ...], model: str, today: dt.date) -> P | None:
    """The entry in force today whose glob matches most specifically (then the latest)."""
    best: tuple[int, dt.date, P] | None = None
    for p in prices:
        if p.since > today:
            continue
        for pattern in p.models:
            if fnmatchcase(model, pattern):
                rank = (len(pattern.replace("*", "")), p.since, p)
                if best is None or rank[:2] > best[:2]:
                    best = rank
    return best[2] if best else None


def _int(usage: dict[str, Any], *names: str) -> int:
    for name in names:
        value = usage.get(name)
        if isinstance(value, int):
            return value
    return 0


def money_fields(cost: dict[str, Any] | None, *, saved: bool) -> dict[str, Any]:
    """The request.done fields for an answer's stored cost: what it spent, or what reusing it
    saved. {} when the answer had nothing countable."""
    if not cost:
        return {}
    usd = cost.get("cost_usd")
    fields = {
        "tokens_in": cost.get("tokens_in", 0),
        "tokens_out": cost.get("tokens_out", 0),
        "saved_usd" if saved else "cost_usd": usd,
    }
    if usd is None:
        fields["unpriced"] = True
    cached = cost.get("cached_tokens")
    if cached and not saved:  # the provider's cache saved this at the time it was spent
        fields["cached_tokens"] = cached
        fields["provider_saved_usd"] = cost.get("provider_saved_usd")
    return fields
