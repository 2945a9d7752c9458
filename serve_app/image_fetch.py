"""Fetching the http(s) image URLs clients name, without becoming their way into our network.

A URL a client sends is fetched from inside the cluster, next to internal
services and the cloud's metadata endpoint (169.254.169.254). So, for the
first URL and again for every redirect:
1. the scheme is http or https and the host is one that ``allowed_hosts`` lists;
2. the host name is resolved once, and every address it gives must be public
   (or inside ``allowed_networks``);
3. the connection goes to that checked address, with the original Host header
   and TLS SNI, so certificates are still verified against the host name and a
   second DNS answer (DNS rebinding) cannot move the connection elsewhere;
4. redirects are followed here, not by httpx, so that each one passes 1-3.
The body is streamed and cut off past ``max_bytes``; ``timeout_s`` bounds it all.
"""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import httpx

from serve_app.config import ImageFetchSettings
from serve_app.errors import OpenAIError, invalid_request

logger = logging.getLogger("serve_app")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# (host, port) -> the addresses the host name resolves to, as strings; may be async.
Resolver = Callable[[str, int], "Iterable[str] | Awaitable[Iterable[str]]"]

_DEFAULT_PORTS = {"http": 80, "https": 443}
_REDIRECTS = {301, 302, 303, 307, 308}
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_URL_SHOWN_CHARS = 200


async def _system_resolver(host: str, port: int) -> list[str]:
    # getaddrinfo blocks; in a thread it cannot stall the event loop. The fetch
    # timeout stops waiting for it (the thread itself finishes on its own).
    infos = await asyncio.to_thread(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos]


@dataclass(frozen=True)
class _HostRule:
    host: str  # lowercase name, or an IP address in its canonical form
    port: int | None  # None: the scheme's default port
    subdomains: bool  # "*.example.com"

    @classmethod
    def parse(cls, entry: str) -> "_HostRule":
        """An allowed_hosts entry, already checked and lowercased by ImageFetchSettings."""
        subdomains = entry.startswith("*.")
        entry = entry[2:] if subdomains else entry
        if entry.startswith("["):
            host, _, rest = entry[1:].partition("]")
            port = rest[1:] or None
        elif entry.count(":") == 1:
            host, port = entry.split(":")
        else:
            host, port = entry, None
        return cls(_canonical_host(host), int(port) if port else None, subdomains)

    def matches(self, host: str, port: int, default_port: int) -> bool:
        if port != (self.port if self.port is not None else default_port):
            return False
        if self.subdomains:
            return host.endswith("." + self.host)
        return host == self.host


def _canonical_host(host: str) -> str:
    """Lowercase, no trailing dot ("example.com." is the same host), IP literals in one spelling."""
    host = host.lower().rstrip(".")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


def _ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _refusal(ip: IPAddress, allowed: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> str | None:
    """Why this address may not be contacted, or None when it may."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 reaches 127.0.0.1
    if any(ip in net for net in allowed):
        return None
    for kind, flag in (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link-local (cloud metadata and the like)", ip.is_link_local),
        ("private", ip.is_private),
        ("multicast", ip.is_multicast),
        ("reserved", ip.is_reserved),
        ("non-public", not ip.is_global),  # e.g. 100.64.0.0/10, shared carrier NAT
    ):
        if flag:
            return kind
    if isinstance(ip, ipaddress.IPv6Address):
        # Addresses that carry an IPv4 address inside them and get routed to it.
        embedded = [ip.sixtofour, *(ip.teredo or ())]
        if ip in _NAT64:
            embedded.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        for inner in embedded:
            if inner is not None and (why := _refusal(inner, allowed)):
                return why
    return None


@dataclass(frozen=True)
class _Target:
    url: httpx.URL
    host: str  # canonical, as matched and resolved
    port: int


class ImageFetcher:
    """Fetches image URLs under ImageFetchSettings; every refusal is a 400 naming the client's parameter."""

    def __init__(self, settings: ImageFetchSettings, resolver: Resolver | None = None):
        self._settings = settings
        self._rules = [_HostRule.parse(h) for h in settings.allowed_hosts]
        self._networks = [ipaddress.ip_network(n, strict=False) for n in settings.allowed_networks]
        self._resolver = resolver or _system_resolver
        # One TLS context (loading the CA bundle takes a while), verifying as httpx does by default.
        self._ssl_context = httpx.create_ssl_context()

    @property
    def enabled(self) -> bool:
        return bool(self._rules)

    async def fetch(self, url: str, param: str) -> bytes:
        """The body of the image at ``url`` (not yet checked to be an image: read_image does that)."""
        if not self.enabled:
            raise invalid_request(
                f"Invalid '{param}': this server does not fetch image URLs. Send the image as a file upload "
                "or as a data URL (data:image/png;base64,...).",
                param,
                "image_url_fetch_disabled",
            )
        try:
            return await asyncio.wait_for(self._follow(url, param), self._settings.timeout_s)
        except (asyncio.TimeoutError, httpx.TimeoutException):
            raise invalid_request(
                f"Invalid '{param}': timed out fetching {_shown(url)} (the limit is "
                f"{self._settings.timeout_s:g} seconds).",
                param,
                "image_url_timeout",
            ) from None

    async def _follow(self, url: str, param: str) -> bytes:
        current = url
        for _ in range(self._settings.max_redirects + 1):
            target = self._check_url(current, param)
            addresses = await self._resolve(target, param)
            body, location = await self._get(target, addresses, param)
            if location is None:
                return body
            current = location
        raise invalid_request(
            f"Invalid '{param}': {_shown(url)} redirected more than {self._settings.max_redirects} times.",
            param,
            "image_url_too_many_redirects",
        )

    def _check_url(self, url: str | httpx.URL, param: str) -> _Target:
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, TypeError, ValueError):
            raise invalid_request(
                f"Invalid '{param}': {_shown(url)} is not a valid URL.", param, "invalid_image_url"
            ) from None
        if parsed.scheme not in _DEFAULT_PORTS or not parsed.raw_host:
            raise invalid_request(
                f"Invalid '{param}': {_shown(url)} is not an http(s) URL with a host.", param, "invalid_image_url"
            )
        if parsed.userinfo:
            # httpx would turn user:password@ into an Authorization header.
            raise invalid_request(
                f"Invalid '{param}': image URLs may not carry credentials (user:password@).", param, "invalid_image_url"
            )
        host = _canonical_host(parsed.raw_host.decode("ascii"))
        default_port = _DEFAULT_PORTS[parsed.scheme]
        port = parsed.port or default_port
        if not any(rule.matches(host, port, default_port) for rule in self._rules):
            # The allowed list is not quoted: it may name internal hosts.
            raise invalid_request(
                f"Invalid '{param}': this server does not fetch images from {host}:{port}.",
                param,
                "image_url_not_allowed",
            )
        return _Target(parsed, host, port)

    async def _resolve(self, target: _Target, param: str) -> list[IPAddress]:
        literal = _ip_literal(target.host)
        if literal is not None:
            addresses = [literal]
        else:
            try:
                answer = self._resolver(target.host, target.port)
                if inspect.isawaitable(answer):
                    answer = await answer
                # dict.fromkeys: one check and one connection attempt per distinct address.
                addresses = [ipaddress.ip_address(a) for a in dict.fromkeys(answer)]
            except (OSError, ValueError, UnicodeError) as exc:
                logger.info("image URL host %s did not resolve: %s: %s", target.host, type(exc).__name__, exc)
                addresses = []
            if not addresses:
                raise _fetch_failed(param, target.url, "its host name could not be resolved")
        # All of them, not just the one connected to: which one a client gets is the resolver's choice.
        for ip in addresses:
            why = _refusal(ip, self._networks)
            if why:
                raise invalid_request(
                    f"Invalid '{param}': {target.host} resolves to a {why} address, which this server does not "
                    "fetch images from.",
                    param,
                    "image_url_not_allowed",
                )
        return [ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped else ip for ip in addresses]

    async def _get(self, target: _Target, addresses: list[IPAddress], param: str) -> tuple[bytes, httpx.URL | None]:
        """(body, None), or (b"", the redirect's absolute URL)."""
        headers = {
            # The URL below names the address; the server must still see the host name.
            "Host": target.url.netloc.decode("ascii"),
            "Accept": "image/*",
            # No compression: a gzip body could inflate far past max_bytes within one chunk.
            "Accept-Encoding": "identity",
            "User-Agent": "serve-app-image-fetch",
        }
        extensions = {"sni_hostname": target.host} if target.url.scheme == "https" else {}
        # trust_env=False: no HTTP(S)_PROXY (a proxy would resolve the name again
        # itself) and no .netrc credentials. A client per request: pooled TLS
        # connections are keyed by address, and one opened for another host
        # name (another SNI) must not be reused.
        async with httpx.AsyncClient(
            trust_env=False, follow_redirects=False, verify=self._ssl_context, timeout=self._settings.timeout_s
        ) as client:
            for i, ip in enumerate(addresses):
                try:
                    async with client.stream(
                        "GET", target.url.copy_with(host=str(ip)), headers=headers, extensions=extensions
                    ) as response:
                        return await self._read(response, target, param)
                except httpx.ConnectError as exc:  # also a failed TLS handshake or certificate check
                    logger.info("image URL %s: connecting to %s failed: %s", target.host, ip, type(exc).__name__)
                    if i + 1 == len(addresses):
                        why = "could not connect to it (or its TLS certificate is not valid)"
                        raise _fetch_failed(param, target.url, why) from None
                except httpx.TimeoutException:
                    raise
                except httpx.HTTPError as exc:
                    logger.info("image URL %s: %s: %s", target.host, type(exc).__name__, exc)
                    raise _fetch_failed(param, target.url, "the connection failed") from None
        raise AssertionError("unreachable: addresses is never empty")

    async def _read(self, response: httpx.Response, target: _Target, param: str) -> tuple[bytes, httpx.URL | None]:
        status = response.status_code
        if status in _REDIRECTS:
            location = response.headers.get("location")
            if not location:
                raise _fetch_failed(param, target.url, f"it answered {status} without a Location")
            try:
                # Relative to the URL as the client named it, not to the pinned address.
                return b"", target.url.join(location)
            except (httpx.InvalidURL, ValueError):
                raise _fetch_failed(param, target.url, "it redirected to an invalid URL") from None
        if not 200 <= status < 300:
            raise _fetch_failed(param, target.url, f"it answered HTTP {status}")
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding != "identity":
            raise _fetch_failed(param, target.url, f"it sent a compressed body (Content-Encoding: {encoding[:20]})")
        limit = self._settings.max_bytes
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise _body_too_large(param, target.url, limit)
        body = bytearray()
        async for chunk in response.aiter_raw():
            body += chunk
            if len(body) > limit:
                raise _body_too_large(param, target.url, limit)
        return bytes(body), None


def _shown(url: str | httpx.URL) -> str:
    text = str(url)
    return text if len(text) <= _URL_SHOWN_CHARS else text[:_URL_SHOWN_CHARS] + "..."


def _fetch_failed(param: str, url: httpx.URL, reason: str) -> OpenAIError:
    return invalid_request(
        f"Invalid '{param}': could not fetch {_shown(url)}: {reason}.", param, "image_url_fetch_failed"
    )


def _body_too_large(param: str, url: httpx.URL, limit: int) -> OpenAIError:
    return invalid_request(
        f"Invalid '{param}': the image at {_shown(url)} is larger than {limit} bytes ({limit / (1 << 20):g} MiB).",
        param,
        "image_too_large",
    )
