"""openai-cache-proxy: a transparent caching, coalescing reverse proxy for the OpenAI API.

The data path, one request (handlers.proxy_handler):

1. read the body (capped: 413), name the tenant (HMAC of key + org + project)
2. plan.make_plan: the first matching rule (rules.py) and the key (keys.py) over the
   canonical body (normalize.py); memoised on a digest of the raw bytes
3. no rule, or Cache-Control: no-store -> pass-through, streamed both ways
4. cache.Cache.get (a Store from stores/, behind a breaker) -> HIT: replay.replay
5. coalesce.Flights: join the key's flight (COALESCED) or lead one (MISS / REFRESH);
   fetch.Fetcher reads upstream.Upstream in its own task into the flight, readers relay it
   from the first chunk then live, and a whole, clean 2xx answer becomes a models.CachedResponse
6. one `request.done` line (log.py) and the counters behind /_proxy/stats (stats.py)
"""

__version__ = "0.1.0"
