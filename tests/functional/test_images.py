# The SDK types every image field as optional; these tests use them as present, which fails
# a test on a None as surely as an assert would.
# mypy: disable-error-code="index,union-attr,arg-type,operator"
"""Generated images are copied to permanent storage and their URLs rewritten (issue 6)."""

from __future__ import annotations

import sqlite3
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import boto3
import pytest
from aiohttp import web
from yarl import URL

from proxy.errors import RehostError
from proxy.images.rehost import ImageRehoster
from proxy.testing import FakeOpenAI
from proxy.testing.fake_openai import make_png
from tests.conftest import BackgroundLoop, ProxyServer, free_port, sdk
from tests.helpers import eventually


def get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


@pytest.fixture
def image_proxy(start_proxy: Any, fake: FakeOpenAI) -> ProxyServer:
    """A proxy that may fetch images from the fake upstream's host and port."""
    server: ProxyServer = start_proxy(image_source_hosts=fake.netloc)
    return server


def test_url_answer_is_rehosted_and_outlives_upstream_url(
    image_proxy: ProxyServer, fake: FakeOpenAI
) -> None:
    """images.generate(response_format="url") returns a proxy URL that still serves the same
    PNG after the upstream URL has expired; the repeat is a HIT with the same URLs."""
    fake.image_ttl_s = 1.0
    with sdk(image_proxy) as c:
        raw = c.images.with_raw_response.generate(
            prompt="a persona portrait", model="dall-e-2", response_format="url"
        )
        first = raw.parse()
        url = first.data[0].url
        assert url.startswith(image_proxy.url + "/_proxy/images/") and url.endswith(".png")
        upstream_url = fake.calls[0].path  # the answer's original URL is no longer visible
        assert upstream_url == "/v1/images/generations"
        assert len(fake.image_downloads) == 1  # the proxy fetched it once
        time.sleep(1.1)
        expired = f"{fake.base_url}/blob/img-1-0.png?se={int(time.time()) - 1}&sig=x"
        assert get(expired)[0] == 403
        status, headers, data = get(url)
        assert status == 200 and data == make_png(10)
        assert headers["Content-Type"] == "image/png"
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert "immutable" in headers["Cache-Control"]
        again = c.images.with_raw_response.generate(
            prompt="a persona portrait", model="dall-e-2", response_format="url"
        )
        assert again.headers["x-cache-status"] == "HIT"
        assert again.parse().data[0].url == url
    assert fake.count("/v1/images/generations") == 1
    assert len(fake.image_downloads) == 2  # the proxy's one fetch, and the probe above


def test_three_images_three_objects(image_proxy: ProxyServer, fake: FakeOpenAI) -> None:
    """n = 3 gives 3 distinct stored images."""
    with sdk(image_proxy) as c:
        result = c.images.generate(prompt="three", n=3, response_format="url")
    urls = [d.url for d in result.data]
    assert len(set(urls)) == 3
    assert [get(u)[2] for u in urls] == [make_png(10 + i) for i in range(3)]


def test_b64_answers_are_cached_as_they_are(image_proxy: ProxyServer, fake: FakeOpenAI) -> None:
    """b64_json answers are cached untouched."""
    with sdk(image_proxy) as c:
        a = c.images.generate(prompt="b64", response_format="b64_json")
        b = c.images.with_raw_response.generate(prompt="b64", response_format="b64_json")
    assert b.headers["x-cache-status"] == "HIT"
    assert b.parse().data[0].b64_json == a.data[0].b64_json
    assert fake.image_downloads == []


def test_expired_upstream_url_passes_through_uncached(
    image_proxy: ProxyServer, fake: FakeOpenAI
) -> None:
    """An image URL already expired upstream: the original answer, nothing cached, and the
    next identical request goes upstream again."""
    fake.image_ttl_s = -10
    with sdk(image_proxy) as c:
        first = c.images.generate(prompt="late", response_format="url")
        assert first.data[0].url.startswith(fake.base_url + "/blob/")
        second = c.images.with_raw_response.generate(prompt="late", response_format="url")
        assert second.headers["x-cache-status"] == "MISS"
    assert fake.count("/v1/images/generations") == 2


def test_host_not_allowed_is_never_fetched(start_proxy: Any, fake: FakeOpenAI) -> None:
    """With the default allowlist (OpenAI's blob host only), a URL on another host is never
    fetched: the client gets the original answer and nothing is cached."""
    proxy = start_proxy()
    with sdk(proxy) as c:
        r = c.images.generate(prompt="x", response_format="url")
        assert r.data[0].url.startswith(fake.base_url)
        again = c.images.with_raw_response.generate(prompt="x", response_format="url")
        assert again.headers["x-cache-status"] == "MISS"
    assert fake.image_downloads == []


@pytest.fixture
def recorder(bg: BackgroundLoop) -> Iterator[tuple[list[str], int]]:
    """A local server that records every hit; /redirect sends a 302 to /target."""
    hits: list[str] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        hits.append(request.path)
        if request.path == "/redirect":
            raise web.HTTPFound("/target")
        return web.Response(body=make_png(1), content_type="image/png")

    async def start() -> tuple[web.AppRunner, int]:
        app = web.Application()
        app.router.add_get("/{tail:.*}", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        return runner, port

    runner, port = bg.run(start())
    yield hits, port
    bg.run(runner.cleanup())


def test_redirect_is_never_followed(
    start_proxy: Any, fake: FakeOpenAI, recorder: tuple[list[str], int]
) -> None:
    """A trusted host whose image URL redirects: the redirect is not followed."""
    hits, port = recorder
    fake.image_url = f"http://127.0.0.1:{port}/redirect"
    proxy = start_proxy(image_source_hosts=f"127.0.0.1:{port}")
    with sdk(proxy) as c:
        r = c.images.generate(prompt="redirect", response_format="url")
    assert r.data[0].url == fake.image_url
    assert hits == ["/redirect"]


async def test_strict_host_resolving_to_private_address_is_never_fetched(
    recorder: tuple[list[str], int], tmp_path: Path
) -> None:
    """The default (strict) host rule: https only, and an address that is loopback or private
    is refused before any connection."""
    hits, port = recorder
    from proxy.images import LocalImageStore

    rehoster = ImageRehoster(LocalImageStore(tmp_path))
    rehoster.allowed = frozenset({f"localhost:{port}"})  # a non-default port is listed with it
    rehoster.strict = frozenset({"localhost"})
    with pytest.raises(RehostError, match="https"):
        await rehoster.fetch(f"http://localhost:{port}/img.png")
    with pytest.raises(RehostError, match="DNSError"):  # the resolver refused every address
        await rehoster.fetch(f"https://localhost:{port}/img.png")
    with pytest.raises(RehostError, match="not an allowed"):
        await rehoster.fetch(f"https://127.0.0.2:{port}/img.png")
    await rehoster.aclose()
    assert hits == []


async def test_odd_image_names_are_refused(image_proxy: ProxyServer) -> None:
    """Traversal and odd names on /_proxy/images/ get 400/404, never a file."""
    names = [
        "../secret.key",
        "..%2fsecret.key",
        "%2e%2e%2fsecret.key",
        "%2e%2e/%2e%2e/etc/passwd",
        "a" * 64 + ".png%00.txt",
        "A" * 64 + ".png",
        "0" * 64 + ".png",
        "0" * 64 + ".exe",
        "",
    ]
    async with aiohttp.ClientSession() as s:
        for name in names:
            url = URL(image_proxy.url + "/_proxy/images/" + name, encoded=True)
            async with s.get(url) as r:
                assert r.status in (400, 404), name
                assert b"secret" not in await r.read()


def test_edit_multipart_is_a_hit_whatever_the_boundary(
    image_proxy: ProxyServer, fake: FakeOpenAI
) -> None:
    """images.edit with the same file and fields is a HIT although every multipart body has
    its own random boundary."""
    png = make_png(7)
    with sdk(image_proxy) as c:
        first = c.images.with_raw_response.edit(
            image=("a.png", png, "image/png"), prompt="add a hat", response_format="url"
        )
        second = c.images.with_raw_response.edit(
            image=("renamed.png", png, "image/png"), prompt="add a hat", response_format="url"
        )
        other = c.images.with_raw_response.edit(
            image=("a.png", make_png(8), "image/png"), prompt="add a hat", response_format="url"
        )
    ctype = [c.headers["Content-Type"] for c in fake.calls]
    assert ctype and all("boundary=" in c for c in ctype)
    assert first.headers["x-cache-status"] == "MISS"
    assert second.headers["x-cache-status"] == "HIT"
    assert second.parse().data[0].url == first.parse().data[0].url
    assert other.headers["x-cache-status"] == "MISS"
    assert fake.count("/v1/images/edits") == 2


@pytest.fixture
def s3_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """moto's S3-compatible server on a free local port, standing in for R2."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for name, value in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    endpoint = f"http://127.0.0.1:{port}"
    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket="images")
    s3.put_bucket_acl(Bucket="images", ACL="public-read")  # like an R2 public bucket
    yield endpoint
    server.stop()


@pytest.mark.parametrize("public", [False, True])
def test_s3_store(start_proxy: Any, fake: FakeOpenAI, s3_server: str, public: bool) -> None:
    """With an S3-compatible server: objects land under the prefix with upstream's bytes, and
    the rewritten URLs (presigned, or on the public base URL) serve them."""
    public_url = f"{s3_server}/images" if public else ""
    proxy = start_proxy(
        image_source_hosts=fake.netloc,
        images="s3://images/generated",
        s3_endpoint_url=s3_server,
        images_public_url=public_url,
    )
    with sdk(proxy) as c:
        result = c.images.generate(prompt="s3 portrait", n=2, response_format="url")
    s3 = boto3.client("s3", endpoint_url=s3_server)
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="images")["Contents"])
    assert len(keys) == 2 and all(k.startswith("generated/") and k.endswith(".png") for k in keys)
    bodies = {s3.get_object(Bucket="images", Key=k)["Body"].read() for k in keys}
    assert bodies == {make_png(10), make_png(11)}
    for item in result.data:
        assert urlsplit(item.url).netloc == urlsplit(s3_server).netloc
        if public:
            assert item.url.startswith(public_url + "/generated/")
        else:
            assert "Signature" in item.url or "X-Amz-Signature" in item.url
        status, _, data = get(item.url)
        assert status == 200 and data in bodies


def test_s3_down_passes_the_answer_through(start_proxy: Any, fake: FakeOpenAI) -> None:
    """An image store that cannot be reached: the original answer, nothing cached."""
    proxy = start_proxy(
        image_source_hosts=fake.netloc,
        images="s3://images/x",
        s3_endpoint_url=f"http://127.0.0.1:{free_port()}",
    )
    with sdk(proxy) as c:
        r = c.images.generate(prompt="down", response_format="url")
        assert r.data[0].url.startswith(fake.base_url)
        again = c.images.with_raw_response.generate(prompt="down", response_format="url")
        assert again.headers["x-cache-status"] == "MISS"


def test_backfill_rehosts_entries_cached_before(
    start_proxy: Any, fake: FakeOpenAI, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`python -m proxy images backfill` rehosts image answers cached with upstream URLs, and
    reports the ones whose URL had already expired."""
    from proxy.__main__ import main

    rules = tmp_path / "no-rehost.toml"
    rules.write_text('[[rule]]\nroute = "/v1/images/*"\nrehost_images = false\n')
    db = tmp_path / "cache.db"
    before = start_proxy(cache=f"sqlite:///{db}", rules=rules, image_source_hosts=fake.netloc)
    with sdk(before) as c:
        kept = c.images.generate(prompt="keep me", response_format="url")
        fake.image_ttl_s = -1
        lost = c.images.generate(prompt="too late", response_format="url")
    assert kept.data[0].url.startswith(fake.base_url)
    assert lost.data[0].url.startswith(fake.base_url)

    def in_file() -> int:  # answers reach SQLite in batches a few ms after they are sent
        with sqlite3.connect(db) as conn:
            return int(conn.execute("SELECT count(*) FROM entries").fetchone()[0])

    eventually(lambda: in_file() == 2)
    public = "http://images.example"
    argv = [
        "images",
        "backfill",
        "--cache",
        f"sqlite:///{db}",
        "--data-dir",
        str(tmp_path / "d"),
        "--image-source-hosts",
        fake.netloc,
        "--public-url",
        public,
        "--secret",
        "s",
    ]
    assert main(argv) == 1  # one answer could not be rescued
    out = capsys.readouterr().out
    assert "2 image answers: 1 rehosted" in out and "1 could not be rescued" in out

    after = start_proxy(cache=f"sqlite:///{db}", data_dir=tmp_path / "d")
    with sdk(after) as c:
        again = c.images.with_raw_response.generate(prompt="keep me", response_format="url")
    assert again.headers["x-cache-status"] == "HIT"
    url = again.parse().data[0].url
    assert url.startswith(public + "/_proxy/images/")
    status, _, data = get(after.url + urlsplit(url).path)
    assert status == 200 and data == make_png(10)
