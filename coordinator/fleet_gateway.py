"""The public face of the SuperLink: a TLS gateway that forwards the Fleet API only.

Why it exists. Flower 1.41's ``flower-superlink`` serves the Fleet API (for
SuperNodes), the Control API (register nodes, start/stop runs) and the Runtime
API (the ServerApp's task queue) on ONE HTTPS port. Without Flower Enterprise
the Control API accepts every caller (``NoOpControlAuthnPlugin``) and, in the
default subprocess isolation, ``/v1/runtime/acquire-task`` has no authentication
either; nor can the port demand client certificates (``uvicorn.run`` is called
without ``ssl_ca_certs``, and no Flower client can present one). So anyone
holding the consortium's public CA certificate who can reach that port could
enrol a node key, start or stop runs, or claim the ServerApp's task.

The fix: bind the SuperLink to 127.0.0.1 and put this gateway on the public
address. It terminates TLS with the SuperLink's own certificate and forwards a
request only when it is a ``POST`` to one of the exact Fleet paths the installed
Flower serves (taken from Flower's own Fleet router, so the list cannot drift);
everything else gets 404 without reaching the SuperLink. Matching is on the
decoded path against a fixed set and the forwarded URL is rebuilt from that set,
so ``..``, percent-encoding and query strings cannot smuggle a Control call
through. Fleet calls keep their SuperNode signature headers, which the SuperLink
still verifies (node authentication is end to end, not the gateway's job).

Run as ``python -m fedvault.coordinator.fleet_gateway --host H --port P
--upstream 127.0.0.1:Q --ssl-certfile C --ssl-keyfile K --ssl-ca-certfile CA``.
"""

from __future__ import annotations

import argparse
import logging
import ssl
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

import httpx

__all__ = ["FLEET_PATHS", "MAX_BODY_BYTES", "FleetGateway", "main"]

_log = logging.getLogger("fedvault.fleet_gateway")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def _fleet_paths() -> frozenset[str]:
    from fastapi.routing import APIRoute
    from flwr.superlink.routers.fleet.router import router

    return frozenset(r.path for r in router.routes if isinstance(r, APIRoute))


#: The only paths the gateway forwards (all ``POST``), e.g. ``/v1/fleet/pull-messages``.
FLEET_PATHS: frozenset[str] = _fleet_paths()
#: Fleet bodies are single protobuf messages; Flower chunks arrays at 5 MiB.
MAX_BODY_BYTES = 64 * 1024 * 1024

# Hop-by-hop headers (RFC 9110 §7.6.1) and headers the upstream uvicorn would
# trust from a loopback peer (X-Forwarded-*): never forwarded.
_DROP_REQUEST = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-real-ip",
    }
)
_DROP_RESPONSE = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding"}
)


class FleetGateway:
    """ASGI app forwarding Fleet calls to ``upstream`` and refusing everything else.

    Parameters
    ----------
    upstream
        ``host:port`` of the SuperLink on loopback.
    ca_certfile
        CA that signed the SuperLink's certificate (verifies the upstream leg).
    """

    def __init__(self, upstream: str, *, ca_certfile: str) -> None:
        self._base = f"https://{upstream}"
        context = ssl.create_default_context(cafile=ca_certfile)
        self._client = httpx.AsyncClient(verify=context, timeout=60.0)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection event."""
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path = scope["path"]
        if scope["method"] in ("GET", "HEAD") and path == "/health":
            await _reply(send, 200, b"")
            return
        if scope["method"] != "POST" or path not in FLEET_PATHS:
            client = scope.get("client") or ("?", 0)
            _log.warning("refused %s %r from %s:%s", scope["method"], path, *client)
            await _reply(send, 404, b"not served on the public Fleet endpoint\n")
            return
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = bool(message.get("more_body", False))
            if len(body) > MAX_BODY_BYTES:
                await _reply(send, 413, b"request body too large\n")
                return
        headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in scope["headers"]
            if k.decode("latin-1").lower() not in _DROP_REQUEST
        ]
        try:
            upstream = await self._client.post(
                self._base + path, content=bytes(body), headers=headers
            )
        except httpx.HTTPError:
            # 503 is what SuperNodes treat as "SuperLink restarting, retry".
            await _reply(send, 503, b"SuperLink unavailable\n")
            return
        if upstream.status_code == 500:
            # Flower answers any unexpected SuperLink error with a bare 500, and its
            # SuperNode does not retry a 500: the message loop ends and the reply or
            # instruction in flight is lost. Seen with 100 SuperNodes: "database is
            # locked" (SQLite's 5 s busy timeout) on pull-messages and push-object.
            # Such errors roll back, and a 503 makes the SuperNode retry with
            # backoff and a fresh signature, as it does while the SuperLink restarts.
            _log.warning("SuperLink error on %s (see its log); told the node to retry", path)
            await _reply(send, 503, b"SuperLink error; retry\n")
            return
        out_headers = [
            (k.encode("latin-1"), v.encode("latin-1"))
            for k, v in upstream.headers.multi_items()
            if k.lower() not in _DROP_RESPONSE
        ]
        await send(
            {"type": "http.response.start", "status": upstream.status_code, "headers": out_headers}
        )
        await send({"type": "http.response.body", "body": upstream.content})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self._client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _reply(send: Send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"text/plain; charset=utf-8")],
        }
    )
    await send({"type": "http.response.body", "body": body})


def main(argv: Sequence[str] | None = None) -> None:
    """Serve the gateway until SIGTERM/SIGINT (uvicorn handles both)."""
    import uvicorn

    parser = argparse.ArgumentParser(description="fedvault public Fleet gateway")
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="SuperLink host:port (loopback)")
    parser.add_argument("--ssl-certfile", required=True)
    parser.add_argument("--ssl-keyfile", required=True)
    parser.add_argument("--ssl-ca-certfile", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s [fleet-gateway] %(message)s"
    )
    uvicorn.run(
        FleetGateway(args.upstream, ca_certfile=args.ssl_ca_certfile),
        host=args.host,
        port=args.port,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
        proxy_headers=False,
        server_header=False,
        access_log=False,  # SuperNodes poll every few seconds; refusals are logged above
        log_level="info",
    )


if __name__ == "__main__":
    main()
