"""`python -m proxy images backfill`: rehost image URLs in answers cached before rehosting.

It walks every entry of the configured store, rehosts the URLs of image answers that still
point at an image source host, and writes the rewritten answer back. Images whose upstream
URL has already expired cannot be rescued: they are counted and listed by key prefix.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys

from rich.progress import Progress

from proxy.app import build_state
from proxy.errors import ConfigError
from proxy.handlers import State
from proxy.images.base import PLACEHOLDER_BASE, has_placeholder
from proxy.images.rehost import ImageRehoster, rewrites, url_items
from proxy.keys import key_id
from proxy.settings import Settings


@dataclasses.dataclass
class BackfillReport:
    scanned: int = 0
    image_entries: int = 0
    rehosted: int = 0
    already: int = 0
    lost: list[str] = dataclasses.field(default_factory=list)


def _needs_rehost(body: bytes, rehoster: ImageRehoster) -> bool:
    _, items = url_items(body)
    return any(rehoster.allows(it["url"]) for it in items)


async def backfill(st: State, *, show_progress: bool = True) -> BackfillReport:
    settings = st.settings
    store, rehoster = st.cache.store, st.rehoster
    assert rehoster is not None
    keys_fn = getattr(store, "keys", None)
    if keys_fn is None:
        raise ConfigError("images backfill needs a persistent store (sqlite:// or redis://)")
    base = settings.public_url or PLACEHOLDER_BASE
    report = BackfillReport()
    try:
        keys: list[str] = await keys_fn()
        with Progress(disable=not show_progress, transient=True) as progress:
            task = progress.add_task("rehosting images", total=len(keys))
            for key in keys:
                progress.advance(task)
                report.scanned += 1
                entry = await store.get(key)
                if entry is None or not rewrites(str(entry.meta.get("route", ""))):
                    continue
                report.image_entries += 1
                if not _needs_rehost(entry.body, rehoster):
                    report.already += 1
                    continue
                new = await rehoster.rewrite(entry.body, base)
                if new is None:
                    report.lost.append(key_id(key))
                    continue
                rule = st.planner.rules.match(
                    "POST", str(entry.meta["route"]), entry.meta.get("model")
                )
                ttl = rule.ttl_s if rule is not None else 365 * 86400.0
                meta = {**entry.meta, "rebase": True} if has_placeholder(new) else entry.meta
                await store.set(key, dataclasses.replace(entry, body=new, meta=meta), ttl)
                report.rehosted += 1
    finally:
        await rehoster.aclose()
        await st.upstream.aclose()
        await store.aclose()
    return report


def main(argv: list[str]) -> int:
    settings = Settings.from_args(
        argv,
        prog="python -m proxy images backfill",
        description="Rehost the images of answers cached before rehosting was on, and list "
        "those whose upstream URL no longer answers. It works on the store the server's "
        "flags name (the proxy may be stopped), so it takes the same flags.",
        epilog=None,
    )
    state = build_state(settings)  # before the loop: it reads files
    report = asyncio.run(backfill(state, show_progress=sys.stderr.isatty()))
    print(
        f"scanned {report.scanned} entries, {report.image_entries} image answers: "
        f"{report.rehosted} rehosted, {report.already} already permanent, "
        f"{len(report.lost)} could not be rescued"
    )
    for key in report.lost:
        print(f"  lost: {key} (its upstream image URL no longer answers)")
    return 0 if not report.lost else 1
