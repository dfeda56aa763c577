"""Request guards of the API server that come before any work: who may call it, and what it must send.

Without an API key a server on this machine could be reached by any web page the user opens, through DNS
rebinding (a name that first resolves to the page's server, then to 127.0.0.1): the browser then sends the
page's host name in ``Host`` and may read the answers. :class:`HostGuard` answers only requests whose ``Host``
(and ``Origin``, when a browser sends one) is one of the server's own names: ``127.0.0.1``, ``localhost``,
``::1``, the ``--host`` it listens on, and each ``--allowed-host``. With an API key a page cannot send
the key, so the key is the guard. :func:`require_json` refuses (415) a POST that does not say it is JSON,
which also keeps browsers from sending one without asking first (a CORS preflight this server does not grant).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit

from llava.serve.protocol import ApiError

__all__ = ["LOOPBACK_NAMES", "HostGuard", "require_json"]

LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
_ANY_ADDRESS = frozenset({"0.0.0.0", "::", ""})


def _normal(name: str) -> str:
    return name.strip().lower().rstrip(".").strip("[]")


def _host_of(header: str) -> str:
    """The name in a ``Host`` header (``name``, ``name:port``, ``[v6]:port``), lower case."""
    header = header.strip()
    if header.startswith("["):
        return _normal(header[1 : header.find("]")] if "]" in header else header)
    if header.count(":") == 1:
        header = header.split(":", 1)[0]
    return _normal(header)


class HostGuard:
    """Checks ``Host`` and ``Origin`` against the server's names; ``enabled=False`` (an API key is set) lets
    everything through. An allowed name ``*`` allows every name."""

    def __init__(self, bind_host: str, allowed_hosts: Iterable[str] = (), *, enabled: bool = True) -> None:
        names = set(LOOPBACK_NAMES) | {_normal(h) for h in allowed_hosts}
        if _normal(bind_host) not in _ANY_ADDRESS:
            names.add(_normal(bind_host))
        self.names = frozenset(names)
        self.enabled = enabled and "*" not in self.names

    def check(self, headers: Mapping[str, str]) -> None:
        """Raise :class:`ApiError` 403 when ``Host`` or ``Origin`` names another host."""
        if not self.enabled:
            return
        host = _host_of(headers.get("host", ""))
        if host not in self.names:
            raise ApiError(403, f"the Host header '{host}' is not a name of this server: without --api-key it "
                                f"answers only {', '.join(sorted(self.names))}; start it with --allowed-host "
                                f"{host or 'NAME'} (or --api-key) to be reached by that name", code="host_not_allowed")
        origin = headers.get("origin")
        if origin is None:
            return
        origin_host = _normal(urlsplit(origin.strip()).hostname or "") if origin.strip() != "null" else "null"
        if origin_host not in self.names:
            raise ApiError(403, f"requests from web pages at '{origin.strip()}' are not answered by this server "
                                "without --api-key", code="origin_not_allowed")


def require_json(headers: Mapping[str, str]) -> None:
    """Raise :class:`ApiError` 415 unless ``Content-Type`` is ``application/json`` (parameters allowed)."""
    kind = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if kind != "application/json" and not (kind.startswith("application/") and kind.endswith("+json")):
        raise ApiError(415, f"the request body must be JSON, sent with 'Content-Type: application/json' (got "
                            f"'{kind or 'none'}')", code="unsupported_media_type")
