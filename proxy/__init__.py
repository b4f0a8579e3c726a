"""openai-cache-proxy: a transparent caching, coalescing reverse proxy for the OpenAI API.

The data path, one request (handlers.proxy_handler, on one screen; docs/architecture.md):

1. intake.read_intake -> Refused (a 4xx) | Opaque (an unreadable Content-Encoding: passed
   through) | Intake: the route (intake.route_of), the body capped and decoded (body.py),
   the cache headers (controls.read_controls), the tenant from every credential header
   (keys.py), the Plan (plan.make_plan: rule, key over the canonical body; memoised on the
   raw bytes; large bodies off the loop)
2. hit.hot: a fresh entry in the hot tier, sent whole (the HIT fast path)
3. intake.onward: the request as it goes upstream, and plan.decide -> PassThrough
   (passthrough.py: streamed both ways, cost counted) | Keyed (embeddings lists item by
   item: embeddings.py)
4. miss.serve_keyed: the stored entry judged Fresh (hit.serve_entry: a HIT, a twin
   converted by twins.py) | Stale | Missing; then choose_flight (coalesce.Flights.take)
   -> Join (COALESCED) | Lead (MISS / REFRESH; by_meaning first for a rule with
   `semantic`, vectors.py); across instances bus.RedisBus.lead answers Local | Leader |
   Follow | Conflict; fetch.Fetcher reads upstream.Upstream (http1.py) into the flight
   (Flight.feed), and answers.storable decides whether the whole answer becomes a
   models.CachedResponse in the store
5. relay.relay / relay.pump: the one write loop to the client (write timeout, drop, cut)
6. one `request.done` line, rendered from a record.Record (log.py), and the counters behind
   /_proxy/stats (stats.py); status.py is the vocabulary of both (CacheStatus; Failure,
   the one set of failure codes for error answers, the `error` and `cut` fields and
   Flight.reason; mark() for the status headers)

Module map:

    __main__.py   subcommands -> Settings.from_args() -> serve.serve()
    settings.py   Settings (one frozen dataclass, a flag and a PROXY_* twin per field)
    serve.py      one process or --workers N; start-up line; healthcheck
    server.py     aiohttp's low-level server with a deadline for request heads
    app.py        build_state, ProxyApp: the /_proxy/ routes (health, stats, metrics,
                  dashboard, purge, images), start-up and shutdown
    handlers.py   proxy_handler: the stages above in order, each match ending in assert_never
    state.py      State (the collaborators a request needs), Planner (what intake needs:
                  rules, secrets, body cap, plan memo), Workers (pools for large bodies),
                  Forward (the upstream request)
    intake.py     request -> Refused | Opaque | Intake (route, body, Plan memo); onward
    controls.py   the cache headers -> ClientControls (Cache-Control, namespace)  [pure]
    caller_keys.py X-Cache-Key, ignored fields, TTL and their aliases -> CallerControls [pure]
    hit.py        a stored entry -> this client's HIT or STALE answer (one place); twins
    miss.py       Keyed: judge -> Fresh | Stale | Missing; flight -> Join | Lead; semantic probe
    relay.py      a flight or a stored answer -> the client: one write loop (pump)
    passthrough.py uncached requests, streamed both ways, cost counted
    record.py     Record: one request's line, filled along the way, rendered once;
                  bounded() for every client-given string a line or label holds
    status.py     CacheStatus, Failure codes, mark(): the status headers      [pure]
    body.py       request Content-Encoding, decoded with a cap                   [pure]
    normalize.py  body -> canonical bytes                                        [pure]
    keys.py       request and tenant digests; Scope: cache key, store key with
                  purge tags, key id                                           [pure]
    plan.py       request -> Plan; decide -> PassThrough | Keyed                 [pure]
    semantic.py   what a semantic lookup compares; the judge's request and verdict [pure]
    guards.py     the guards against false semantic hits, as keyed digests       [pure]
    calibrate.py  `semantic calibrate`: a model's threshold from labelled pairs
    rules.py      rules/*.toml -> Rules                                          [pure]
    sse.py        SSE checks, fed incrementally (Scanner)                        [pure]
    cost.py       usage -> tokens and dollars; money_fields for the log line     [pure]
    models.py     CachedResponse, the store clock
    errors.py     every exception type, under ProxyError; OpenAI-shaped error bodies
    stores/       memory, sqlite (capped, swept; keyfilter: its keys, in memory), redis (+ cluster);
                  open_store()
    cache.py      hot tier, breaker (reads only), probe, purge
    coalesce.py   Flights.take (join or lead), Flight.feed (head, chunks, end), Reader:
                  single flight in one process, bounded buffers
    bus.py        Redis lease + stream: flights across instances; who leads
    fetch.py      upstream -> flight -> store (a task, or the leading handler)
    answers.py    storable(): may a finished answer be stored; its stored form from an
                  EntrySpec (depends on nothing above it)                      [pure]
    upstream.py   the upstream: one http1.Client for every method, the base URL joined
                  with each path once (join_path), header filters
    http1.py      a lean HTTP/1.1 client for one origin: a keep-alive pool that reuses only
                  clean connections, httptools parser, codings decoded piece by piece (and
                  checked to end), read and write timeouts, Happy Eyeballs, egress proxies
    replay.py     a stored answer as one response; its headers and Age
    twins.py      a stored stream <-> its JSON object (chat, responses)          [pure]
    vectors.py    embeddings (exact cache or a local server), the shared vector index
                  (memory-capped), lookup, the optional verifier
    purge.py      purge filters -> key pattern; the purge subcommand
    images/       rehosting image URLs to a local folder or S3/R2 (SSRF-guarded)
    log.py, stats.py, metrics.py, report.py, dashboard.html, auth.py, backfill.py, demo.py
    testing/      the fake OpenAI upstream, a hostile upstream, log line generators
"""

__version__ = "0.1.0"
