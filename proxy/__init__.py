"""openai-cache-proxy: a transparent caching, coalescing reverse proxy for the OpenAI API.

The data path, one request (handlers.proxy_handler):

1. read the body (capped: 413; `Expect: 100-continue` answered here), decode its
   Content-Encoding capped while decoding (body.py), name the tenant from every credential
   header (keys.py)
2. plan.make_plan: the first matching rule (rules.py) and the key (keys.py) over the
   canonical body (normalize.py: JSON under any content type, bounded depth, exact numbers);
   memoised on a digest of the raw bytes; large bodies are planned off the loop
3. plan.decide -> PassThrough (no rule, Cache-Control: no-store: streamed both ways) or
   Keyed (key, freshness, what to store)
4. cache.Cache.get (a Store from stores/, behind a hot tier and a breaker) -> HIT: replay.py
   (twins.py converts a stored stream to JSON or back); on an exact miss, a rule with
   `semantic` looks the request up by meaning (vectors.py, guards in guards.py) -> HIT
5. coalesce.Flights: join the key's flight (COALESCED) or lead one (MISS / REFRESH); across
   instances bus.RedisBus.lead answers Local | Leader | Follow | Conflict; fetch.Fetcher
   reads upstream.Upstream (http1.py) into the flight (in its own task, or a whole chat or
   Responses answer in the leading handler), readers relay it from the first chunk then
   live (bounded, with a write timeout), and answers.storable decides whether the whole
   answer becomes a models.CachedResponse in the store
6. one `request.done` line, rendered from a record.Record (log.py), and the counters behind
   /_proxy/stats (stats.py); status.CacheStatus is the vocabulary of both

Module map:

    __main__.py   subcommands -> Settings.from_args() -> serve.serve()
    settings.py   Settings (one frozen dataclass, a flag and a PROXY_* twin per field)
    serve.py      one process or --workers N; start-up line; healthcheck
    server.py     aiohttp's low-level server with a deadline for request heads
    app.py        build_state, ProxyApp: the /_proxy/ routes (health, stats, metrics,
                  dashboard, purge, images), start-up and shutdown
    handlers.py   proxy_handler: the data path above
    record.py     Record: one request's line, filled along the way, rendered once
    status.py     CacheStatus: headers, Cache-Status, log and stats labels       [pure]
    body.py       request Content-Encoding, decoded with a cap                   [pure]
    normalize.py  body -> canonical bytes                                        [pure]
    keys.py       tenant digest, cache key, store key with purge tags            [pure]
    plan.py       request -> Plan; Cache-Control                                 [pure]
    semantic.py   what a semantic lookup compares; the judge's request and verdict [pure]
    guards.py     the guards against false semantic hits, as keyed digests       [pure]
    calibrate.py  `semantic calibrate`: a model's threshold from labelled pairs
    rules.py      rules/*.toml -> Rules                                          [pure]
    sse.py        SSE checks, fed incrementally (Scanner)                        [pure]
    cost.py       usage -> tokens and dollars                                    [pure]
    models.py     CachedResponse, the store clock
    errors.py     every exception type, under ProxyError; OpenAI-shaped error bodies
    stores/       memory, sqlite (capped, swept; keyfilter: its keys, in memory), redis (+ cluster);
                  open_store()
    cache.py      hot tier, breaker (reads only), probe, purge
    coalesce.py   Flight, Reader: single flight in one process, bounded buffers
    bus.py        Redis lease + stream: flights across instances; who leads
    fetch.py      upstream -> flight -> store (a task, or the leading handler)
    answers.py    storable(): may a finished answer be stored; its stored form   [pure]
    upstream.py   the upstream: one http1.Client for every method, the base URL joined
                  with each path once (join_path), header filters
    http1.py      a lean HTTP/1.1 client for one origin: a keep-alive pool that reuses only
                  clean connections, httptools parser, codings decoded piece by piece (and
                  checked to end), read and write timeouts, Happy Eyeballs, egress proxies
    replay.py     a stored answer -> the client (whole, in pieces, or paced)
    twins.py      a stored stream <-> its JSON object (chat, responses)          [pure]
    vectors.py    embeddings (exact cache or a local server), the shared vector index
                  (memory-capped), lookup, the optional verifier
    purge.py      purge filters -> key pattern; the purge subcommand
    images/       rehosting image URLs to a local folder or S3/R2 (SSRF-guarded)
    log.py, stats.py, metrics.py, report.py, dashboard.html, auth.py, backfill.py, demo.py
    testing/      the fake OpenAI upstream, a hostile upstream, log line generators
"""

__version__ = "0.1.0"
