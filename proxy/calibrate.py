"""`python -m proxy semantic calibrate`: the similarity threshold to use with an embeddings
model, measured on labelled question pairs with the guards on.

Each pair is a JSON line `{"a": ..., "b": ..., "same_answer": true|false}` (optional:
`"kind"`, a label the table groups by, and `"split": "held-out"`). Both texts are embedded
through the configured embeddings endpoint (--semantic-embeddings-url and its key, else the
upstream with OPENAI_API_KEY), and for every threshold from 0.80 to 0.99 the table shows,
per kind, the share of pairs the cache would serve: same-answer pairs served (good) and
traps served (wrong answers). The threshold chosen is a conservative one (`choose`): among
the thresholds that serve at most half of --max-wrong of the traps, those serving within
SERVED_MARGIN of the most same-answer pairs, the highest; a harder set than the one it was
tuned on then still stays within --max-wrong. When the file holds a held-out split, it is
chosen on the other pairs and the figures reported are the held-out ones. The last line is JSON:
{"model", "threshold", "served", "wrong"} (shares, 0 to 1; threshold null if none fits).

The shipped set (proxy/semantic_pairs.jsonl) was written for this project: paraphrases and
near repeats, and traps of every kind the guards cover (negation, antonyms and affixes,
scope, entities, numbers, order and direction, language).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import aiohttp
import numpy as np
import orjson

from proxy import guards
from proxy.errors import ConfigError

THRESHOLDS = tuple(round(0.80 + i / 100, 2) for i in range(20))
SERVED_MARGIN = 0.03
"""The chosen threshold may serve this much less (a share) than the most serving one."""
BATCH = 32
PAIRS_MAX = 100_000


@dataclass(frozen=True, slots=True)
class Pair:
    a: str
    b: str
    same_answer: bool
    kind: str
    held_out: bool


@dataclass(frozen=True, slots=True)
class Scored:
    """A pair as the cache sees it: the similarity and the guards' refusal (or None)."""

    pair: Pair
    similarity: float
    refusal: str | None

    def served(self, threshold: float) -> bool:
        return self.similarity >= threshold and self.refusal is None


@dataclass(frozen=True, slots=True)
class Point:
    threshold: float
    served: float
    """Share of same-answer pairs served."""
    wrong: float
    """Share of traps served (wrong answers)."""
    by_kind: tuple[tuple[str, float], ...]
    """Share served per kind."""


def read_pairs(lines: Sequence[bytes], source: str) -> list[Pair]:
    """Labelled pairs from JSON lines; ConfigError naming the first bad line."""
    pairs: list[Pair] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            doc = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise ConfigError(f"{source} line {n}: not JSON") from None
        if (
            not isinstance(doc, dict)
            or not isinstance(doc.get("a"), str)
            or not isinstance(doc.get("b"), str)
            or not isinstance(doc.get("same_answer"), bool)
        ):
            raise ConfigError(f'{source} line {n}: needs "a", "b" (text), "same_answer" (bool)')
        kind = doc.get("kind")
        default = "same answer" if doc["same_answer"] else "trap"
        pairs.append(
            Pair(
                doc["a"],
                doc["b"],
                doc["same_answer"],
                kind if isinstance(kind, str) and kind else default,
                doc.get("split") == "held-out",
            )
        )
        if len(pairs) > PAIRS_MAX:
            raise ConfigError(f"{source}: more than {PAIRS_MAX} pairs")
    if not pairs:
        raise ConfigError(f"{source}: no pairs")
    return pairs


def score(pairs: Sequence[Pair], va: np.ndarray, vb: np.ndarray) -> list[Scored]:
    """Similarities (rows of unit vectors) and the guards' refusals, pair by pair."""
    sims = np.einsum("ij,ij->i", va, vb)
    key = b"calibrate"
    return [
        Scored(p, float(s), guards.refusal(guards.features(p.a, key), guards.features(p.b, key)))
        for p, s in zip(pairs, sims, strict=True)
    ]


def point(scored: Sequence[Scored], threshold: float) -> Point:
    """What the cache serves at `threshold`."""
    same = [s for s in scored if s.pair.same_answer]
    traps = [s for s in scored if not s.pair.same_answer]
    kinds = sorted({s.pair.kind for s in scored}, key=lambda k: (k not in _SAME_KINDS(scored), k))
    by_kind = tuple((k, _share([s for s in scored if s.pair.kind == k], threshold)) for k in kinds)
    return Point(threshold, _share(same, threshold), _share(traps, threshold), by_kind)


def _SAME_KINDS(scored: Sequence[Scored]) -> set[str]:
    return {s.pair.kind for s in scored if s.pair.same_answer}


def _share(scored: Sequence[Scored], threshold: float) -> float:
    if not scored:
        return 0.0
    return sum(s.served(threshold) for s in scored) / len(scored)


def choose(
    points: Sequence[Point], max_wrong: float, margin: float = SERVED_MARGIN
) -> Point | None:
    """A conservative threshold: among the points serving at most `max_wrong / 2` of the
    traps (else at most `max_wrong`), those within `margin` of the most same-answer pairs
    served, the highest threshold. On the evaluator's unseen pairs the lowest threshold
    that fitted the tuning set served three times the traps it did there; half the budget
    and the highest near-best threshold leave room for that. None when nothing fits."""
    for budget in (max_wrong / 2, max_wrong):
        fits = [p for p in points if p.wrong <= budget + 1e-12]
        if fits:
            best = max(p.served for p in fits)
            near = [p for p in fits if p.served >= best - margin - 1e-12]
            return max(near, key=lambda p: p.threshold)
    return None


def table(points: Sequence[Point], same_kinds: set[str]) -> str:
    """Served % per kind (same-answer kinds: good; trap kinds: wrong answers) per threshold."""
    kinds = [k for k, _ in points[0].by_kind]
    width = max(8, *(len(k) + 1 for k in kinds))
    head = "threshold  served  wrong  " + "".join(
        f"{k + ('' if k in same_kinds else '*'):>{width}}" for k in kinds
    )
    rows = [head]
    for p in points:
        cells = "".join(f"{100 * share:>{width - 1}.0f}%" for _, share in p.by_kind)
        rows.append(f"{p.threshold:>9.2f} {100 * p.served:>6.1f}% {100 * p.wrong:>5.1f}%  {cells}")
    rows.append("(% of pairs served; * a trap kind: served there is a wrong answer)")
    return "\n".join(rows)


# ---------------------------------------------------------------- the I/O shell


def _embeddings_url(base: str) -> str:
    base = base.rstrip("/")
    return base + "/embeddings" if base.endswith("/v1") else base + "/v1/embeddings"


async def embed_all(url: str, key: str, model: str, texts: Sequence[str]) -> np.ndarray:
    """Unit vectors of `texts`, asked in batches; RuntimeError naming a failed answer."""
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    out: list[np.ndarray] = []
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for start in range(0, len(texts), BATCH):
            batch = list(texts[start : start + BATCH])
            body = orjson.dumps({"model": model, "input": batch, "encoding_format": "float"})
            async with session.post(url, data=body, headers=headers) as resp:
                data = await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"{url} answered {resp.status}: {data[:300]!r}")
            rows = sorted(orjson.loads(data)["data"], key=lambda d: d["index"])
            if len(rows) != len(batch):
                raise RuntimeError(f"{url} answered {len(rows)} vectors for {len(batch)} texts")
            for row in rows:
                v = np.asarray(row["embedding"], dtype=np.float32)
                out.append(v / (float(np.linalg.norm(v)) or 1.0))
    return np.vstack(out)


def shipped_pairs() -> bytes:
    return resources.files("proxy").joinpath("semantic_pairs.jsonl").read_bytes()


def parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m proxy semantic calibrate",
        description="Measure an embeddings model on labelled question pairs (guards on) and "
        "print the similarity threshold to use with it (last line, JSON). Run it before "
        'semantic = "on" with any model.',
    )
    p.add_argument("--model", required=True, help="the embeddings model (semantic_model)")
    p.add_argument("--pairs", type=Path, help="JSONL pairs [default: the shipped set]")
    p.add_argument(
        "--max-wrong", type=float, default=0.05, help="largest share of traps served [0.05]"
    )
    p.add_argument(
        "--semantic-embeddings-url",
        default=environ.get("PROXY_SEMANTIC_EMBEDDINGS_URL", ""),
        help="an OpenAI-compatible embeddings server [env PROXY_SEMANTIC_EMBEDDINGS_URL; "
        "default: --upstream]",
    )
    p.add_argument(
        "--semantic-embeddings-key",
        default=environ.get("PROXY_SEMANTIC_EMBEDDINGS_KEY", ""),
        help="its bearer token [env PROXY_SEMANTIC_EMBEDDINGS_KEY]",
    )
    p.add_argument(
        "--upstream",
        default=environ.get("PROXY_UPSTREAM", "https://api.openai.com"),
        help="used when no embeddings server is given, with OPENAI_API_KEY [env PROXY_UPSTREAM]",
    )
    return p


def main(argv: Sequence[str], environ: Mapping[str, str] = os.environ) -> int:
    args = parser(environ).parse_args(argv)
    if not 0 <= args.max_wrong < 1:
        raise ConfigError("--max-wrong must be at least 0 and below 1")
    if args.pairs is not None:
        try:
            raw = args.pairs.read_bytes()
        except OSError as exc:
            raise ConfigError(f"--pairs {args.pairs}: {exc.strerror}") from None
        pairs = read_pairs(raw.splitlines(), str(args.pairs))
    else:
        pairs = read_pairs(shipped_pairs().splitlines(), "the shipped pairs")
    if args.semantic_embeddings_url:
        url, key = _embeddings_url(args.semantic_embeddings_url), args.semantic_embeddings_key
    else:
        url, key = _embeddings_url(args.upstream), environ.get("OPENAI_API_KEY", "")
    texts = [t for p in pairs for t in (p.a, p.b)]
    try:
        vectors = asyncio.run(embed_all(url, key, args.model, texts))
    except (aiohttp.ClientError, RuntimeError, KeyError, TypeError, ValueError) as exc:
        print(f"openai-cache-proxy: embeddings failed: {exc}", file=sys.stderr)
        return 1
    scored = score(pairs, vectors[0::2], vectors[1::2])
    tune = [s for s in scored if not s.pair.held_out]
    held = [s for s in scored if s.pair.held_out]
    same_kinds = _SAME_KINDS(scored)
    points = [point(tune, t) for t in THRESHOLDS]
    print(f"{args.model}: {len(tune)} pairs" + (f" (and {len(held)} held out)" if held else ""))
    print(table(points, same_kinds))
    chosen = choose(points, args.max_wrong)
    result: dict[str, object] = {"model": args.model, "threshold": None}
    if chosen is not None:
        result |= {"threshold": chosen.threshold, "served": round(chosen.served, 4)}
        result["wrong"] = round(chosen.wrong, 4)
        if held:
            check = point(held, chosen.threshold)
            print(f"\nheld out ({len(held)} pairs, not used to choose) at {chosen.threshold:.2f}:")
            print("\n".join(table([check], same_kinds).split("\n")[:2]))
            result |= {"served": round(check.served, 4), "wrong": round(check.wrong, 4)}
            result["split"] = "held-out"
    print(orjson.dumps(result).decode())
    return 0 if chosen is not None else 1
