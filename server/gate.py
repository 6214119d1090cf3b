"""The sites' door: an HTTPS proxy that passes the Fleet API's routes and nothing else.

Flower 1.42's SuperLink serves its Fleet API (SuperNodes), its Control API (run submission,
node registration) and its runtime API (the ServerApp) on one port. Opening that port to
the hospitals would let anyone who reaches it register a key or submit a run, because the
Control API has no account authentication outside Flower's enterprise plugins. So the
SuperLink listens on loopback only, and this gate listens on the sites' port and forwards
the exact routes an authenticated SuperNode calls (:data:`FLEET_ROUTES`, POST) and
``/health`` (GET, HEAD); everything else answers 404.

The decision is made on the request target exactly as it arrived (``raw_path``), and that
same path is what goes upstream: a target holding a dot segment, an empty segment, a
percent-escape, a backslash, a ``;`` parameter, a query or any non-ASCII byte matches no
route, so no normalisation on either side can turn an allowed path into another one.

A 500 from the SuperLink on a Fleet route (its SQLite state busy: "database is locked")
goes to the site as 503: Flower 1.42's SuperNode retries 502-504 with back-off but gives
up on a 500, and then stays alive without working.

Run by ``ark-server``: ``python -m server.gate --host H --port P --upstream URL ...``.
"""

from __future__ import annotations

import argparse
import logging
import ssl

import httpx
import uvicorn
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

log = logging.getLogger("ark.gate")

# What flower-supernode 1.42 calls with node authentication on (supernode/fleet_http_client.py).
# register-node and unregister-node are left out: SuperNodes use them only to register
# themselves, which a SuperLink with --enable-supernode-auth refuses anyway.
FLEET_ROUTES = frozenset(f"/v1/fleet/{r}" for r in (
    "activate-node", "deactivate-node", "send-node-heartbeat", "pull-messages",
    "push-messages", "get-run", "get-fab", "push-object", "pull-object",
    "confirm-message-received",
))
HEALTH = "/health"
# Hop-by-hop headers (RFC 9110 7.6.1) are not forwarded.
HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "host", "content-length",
}  # fmt: skip


def route(method: str, raw_path: bytes, query: bytes = b"") -> str | None:
    """The path to forward for a request, or None if the gate must refuse it.

    Only an exact, byte-for-byte match of an allowed route with the allowed method passes.
    """
    if query:
        return None
    try:
        path = raw_path.decode("ascii")
    except UnicodeDecodeError:
        return None
    if method == "POST" and path in FLEET_ROUTES:
        return path
    if method in ("GET", "HEAD") and path == HEALTH:
        return path
    return None


class Gate:
    """The proxy, as a bare ASGI app (no router runs before the check).

    Args:
        upstream: The SuperLink's loopback URL.
        verify: Verifies the SuperLink's certificate (or False).
    """

    def __init__(self, upstream: str, verify: ssl.SSLContext | bool) -> None:
        # No timeout: a large model download may take long; the SuperLink enforces its own.
        self.client = httpx.AsyncClient(verify=verify, timeout=None)
        self.base = httpx.URL(upstream)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        raw = scope.get("raw_path") or scope["path"].encode("utf-8", "surrogateescape")
        path = route(scope["method"], raw, scope.get("query_string", b""))
        if path is None:
            log.warning("refused %s %r from %s", scope["method"], raw[:200],
                        (scope.get("client") or ("?",))[0])
            response: Response = PlainTextResponse("not found\n", status_code=404)
        else:
            response = await self._forward(Request(scope, receive), path)
        await response(scope, receive, send)

    async def _forward(self, request: Request, path: str) -> Response:
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        # raw_path: httpx sends these bytes as they are (no dot-segment removal, no quoting).
        req = self.client.build_request(
            request.method, self.base.copy_with(raw_path=path.encode()), headers=headers,
            content=request.stream(),
        )
        try:
            resp = await self.client.send(req, stream=True)
        except httpx.TransportError:
            return PlainTextResponse("SuperLink unavailable\n", status_code=503)
        if resp.status_code == 500 and path in FLEET_ROUTES:
            await resp.aread()
            await resp.aclose()
            log.warning("SuperLink answered 500 to %s: passed on as 503, so the site retries: %s",
                        path, resp.text[:300])
            return PlainTextResponse("SuperLink busy, try again\n", status_code=503,
                                     headers={"Retry-After": "1"})
        out_headers = {k: v for k, v in resp.headers.items() if k.lower() not in HOP_BY_HOP}
        return StreamingResponse(
            resp.aiter_raw(), status_code=resp.status_code, headers=out_headers,
            background=BackgroundTask(resp.aclose),
        )

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            event = await receive()
            if event["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif event["type"] == "lifespan.shutdown":
                await self.client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return


def create_app(upstream: str, verify: ssl.SSLContext | bool) -> Gate:
    """The gate in front of the SuperLink at ``upstream``."""
    return Gate(upstream, verify)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m server.gate", description=__doc__.splitlines()[0])
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True, help="e.g. https://127.0.0.1:9200")
    p.add_argument("--ssl-ca-certfile", help="verifies the SuperLink's certificate")
    p.add_argument("--ssl-certfile")
    p.add_argument("--ssl-keyfile")
    args = p.parse_args(argv)
    verify: ssl.SSLContext | bool = False
    if args.ssl_ca_certfile:
        verify = ssl.create_default_context(cafile=args.ssl_ca_certfile)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    uvicorn.run(
        create_app(args.upstream, verify), host=args.host, port=args.port,
        ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile,
        log_level="warning", access_log=False,
    )


if __name__ == "__main__":
    main()
