"""The sites' door: an HTTPS proxy that passes the Fleet API and nothing else.

Flower 1.42's SuperLink serves its Fleet API (SuperNodes), its Control API (run submission,
node registration) and its runtime API (the ServerApp) on one port. Opening that port to
the hospitals would let anyone who reaches it register a key or submit a run, because the
Control API has no account authentication outside Flower's enterprise plugins. So the
SuperLink listens on loopback only, and this gate listens on the sites' port and forwards
``/v1/fleet/*`` (and ``/health``) to it; every other path answers 404.

Run by ``ark-server``: ``python -m server.gate --host H --port P --upstream URL ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import ssl
from collections.abc import AsyncIterator

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

ALLOWED_PREFIXES = ("/v1/fleet/",)
ALLOWED_PATHS = ("/health",)
# Hop-by-hop headers (RFC 9110 7.6.1) are not forwarded.
HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "host", "content-length",
}  # fmt: skip


def allowed(path: str) -> bool:
    return path in ALLOWED_PATHS or path.startswith(ALLOWED_PREFIXES)


def create_app(upstream: str, verify: ssl.SSLContext | bool) -> Starlette:
    """The proxy app; ``upstream`` is the SuperLink's loopback URL."""
    # No timeout: a large model download may take long; the SuperLink enforces its own.
    client = httpx.AsyncClient(base_url=upstream, verify=verify, timeout=None)

    async def proxy(request: Request) -> Response:
        if not allowed(request.url.path):
            return PlainTextResponse("not found\n", status_code=404)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        req = client.build_request(
            request.method, request.url.path, params=request.query_params,
            headers=headers, content=request.stream(),
        )
        try:
            resp = await client.send(req, stream=True)
        except httpx.TransportError:
            return PlainTextResponse("SuperLink unavailable\n", status_code=503)
        out_headers = {k: v for k, v in resp.headers.items() if k.lower() not in HOP_BY_HOP}
        return StreamingResponse(
            resp.aiter_raw(), status_code=resp.status_code, headers=out_headers,
            background=BackgroundTask(resp.aclose),
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await client.aclose()

    methods = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"]
    return Starlette(routes=[Route("/{path:path}", proxy, methods=methods)], lifespan=lifespan)


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
    uvicorn.run(
        create_app(args.upstream, verify), host=args.host, port=args.port,
        ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile,
        log_level="warning", access_log=False,
    )


if __name__ == "__main__":
    main()
