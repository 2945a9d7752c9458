"""The scheme and host a client used, for the image URLs the ingress returns.

Behind a reverse proxy, the request Ray's proxy receives names the reverse
proxy's upstream (``Host: 127.0.0.1:8000``, plain HTTP), not what the client
used. Proxies say the latter in ``Forwarded`` (RFC 7239) or
``X-Forwarded-Host`` / ``X-Forwarded-Proto``; anyone can send those headers,
so they are believed only when the connection came from an address in
``trusted_proxies``, and then only the last value (the one the proxy nearest
the service wrote or passed on).

What Ray 2.60 hands the ingress (read in ray/serve/_private/http_util.py and
uvicorn/middleware/proxy_headers.py, and checked by
tests/integration/test_contract.py): its HTTP proxy runs uvicorn with
``proxy_headers`` at uvicorn's default (on) and ``forwarded_allow_ips`` at its
default, env ``FORWARDED_ALLOW_IPS`` or ``127.0.0.1,::1``. For a connection
from one of those addresses uvicorn has already, before Ray pickles the ASGI
scope to the ingress replica, set the scope's ``scheme`` from
X-Forwarded-Proto and its ``client`` from X-Forwarded-For (port 0 when the
entry names none). So the peer the scope shows may be a header's, and so may
the scheme: :func:`peer_of` undoes the first, :meth:`Forwarding.base_url`
the second.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass

from starlette.requests import Request

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# uvicorn's own default when FORWARDED_ALLOW_IPS is unset (uvicorn/config.py).
UVICORN_TRUSTED_DEFAULT = "127.0.0.1,::1"
_HOST_RE = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?$")
_SCHEMES = ("http", "https")


def parse_networks(values: list[str] | str) -> list[Network] | None:
    """IPs and CIDR networks; None for uvicorn's ``*`` (any address).
    Names that are not addresses (uvicorn accepts them as literals) are skipped."""
    items = [v.strip() for v in values.split(",")] if isinstance(values, str) else list(values)
    if "*" in items:
        return None
    networks = []
    for item in items:
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            continue
    return networks


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _within(host: str, networks: list[Network] | None) -> bool:
    if networks is None:
        return True
    address = _address(host)
    return address is not None and any(address in n for n in networks)


def _split_host_port(entry: str) -> tuple[str, int]:
    """An X-Forwarded-For entry as uvicorn reads it: host and port, 0 when none."""
    entry = entry.strip()
    if entry.startswith("[") and "]:" in entry:
        host, _, port = entry[1:].partition("]:")
        return host, int(port) if port.isdigit() else 0
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        return host, int(port) if port.isdigit() else 0
    return entry.strip("[]"), 0


def _uvicorn_client(forwarded_for: str, uvicorn_trusted: list[Network] | None) -> tuple[str, int]:
    """The client uvicorn puts in the scope for this X-Forwarded-For: the
    last entry it does not trust, else the first."""
    entries = [_split_host_port(e) for e in forwarded_for.split(",")]
    if uvicorn_trusted is not None:
        for host, port in reversed(entries):
            if not _within(host, uvicorn_trusted):
                return host, port
    return entries[0]


@dataclass(frozen=True)
class Peer:
    """Who opened the connection to Ray's proxy: an address, or (``host`` None)
    one of uvicorn's trusted addresses, when uvicorn replaced it."""

    host: str | None
    uvicorn_trusted: bool  # uvicorn applied X-Forwarded-Proto to the scope's scheme


def peer_of(request: Request, uvicorn_trusted: list[Network] | None) -> Peer:
    client = request.client
    if client is None:
        return Peer(None, False)
    forwarded_for = ", ".join(request.headers.getlist("x-forwarded-for"))
    # Replaced from the header: uvicorn gives an entry without a port port 0,
    # and no real connection comes from port 0. (An entry with a port is not
    # taken for a replacement: a client could name its own address and port.)
    if client.port == 0 and forwarded_for.strip() and (client.host, 0) == _uvicorn_client(forwarded_for, uvicorn_trusted):
        return Peer(None, True)
    return Peer(client.host, _within(client.host, uvicorn_trusted))


def _last(values: list[str]) -> str | None:
    items = [v.strip() for v in ",".join(values).split(",") if v.strip()]
    return items[-1] if items else None


def _last_forwarded_element(values: list[str]) -> dict[str, str]:
    """The last element of RFC 7239 Forwarded headers, as {parameter: value}."""
    elements = re.findall(r'(?:[^,"]|"[^"]*")+', ",".join(values))
    if not elements:
        return {}
    pairs = {}
    for pair in re.findall(r'(?:[^;"]|"[^"]*")+', elements[-1]):
        name, _, value = pair.partition("=")
        pairs[name.strip().lower()] = value.strip().strip('"')
    return pairs


class Forwarding:
    """Decides the base of image URLs from a request and ``trusted_proxies``."""

    def __init__(self, trusted_proxies: list[str], uvicorn_trusted: str | None = None):
        self.trusted = parse_networks(trusted_proxies) or []
        if uvicorn_trusted is None:
            # Read as uvicorn reads it; the same on every node, as Ray's workers inherit it from `ray start`.
            uvicorn_trusted = os.environ.get("FORWARDED_ALLOW_IPS", UVICORN_TRUSTED_DEFAULT)
        self.uvicorn_trusted = parse_networks(uvicorn_trusted)

    def _trusts(self, peer: Peer) -> bool:
        if peer.host is not None:
            return _within(peer.host, self.trusted)
        # uvicorn hid which of its trusted addresses connected: trust it if we trust one of them.
        if self.uvicorn_trusted is None:
            return False
        return any(
            n.version == t.version and n.subnet_of(t) for n in self.uvicorn_trusted for t in self.trusted  # type: ignore[arg-type]
        )

    def base_url(self, request: Request) -> str:
        """``scheme://host[/root_path]`` the client used, without a trailing slash."""
        headers = request.headers
        peer = peer_of(request, self.uvicorn_trusted)
        scheme = request.url.scheme
        if peer.uvicorn_trusted and headers.get("x-forwarded-proto"):
            # The scope's scheme is the header's; the connection to Ray's proxy
            # behind a TLS-terminating proxy is plain HTTP.
            scheme = "http"
        netloc = request.base_url.netloc
        if self._trusts(peer):
            element = _last_forwarded_element(headers.getlist("forwarded"))
            proto = (element.get("proto") or _last(headers.getlist("x-forwarded-proto")) or "").lower()
            host = element.get("host") or _last(headers.getlist("x-forwarded-host")) or ""
            if proto in _SCHEMES:
                scheme = proto
            if _HOST_RE.match(host):
                netloc = host
        return str(request.base_url.replace(scheme=scheme, netloc=netloc)).rstrip("/")
