"""Checks on URLs Bisik sends requests to, so a configured URL cannot reach internal services."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit


class UnsafeUrlError(ValueError):
    """A URL is not http(s), or its host resolves to an address Bisik must not call."""


def check_url_syntax(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise UnsafeUrlError(f"{url!r} must start with http:// or https://")
    if not parts.hostname:
        raise UnsafeUrlError(f"{url!r} has no host")


def is_private_address(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


async def check_public_url(url: str, *, allow_private: bool) -> None:
    """Raise UnsafeUrlError unless every address the URL's host resolves to is public.

    With `allow_private`, loopback and private addresses pass too (for development and tests).
    NOTE: the HTTP client resolves the host again when it connects, so a DNS answer that changes
    between the two lookups is not caught here.
    """
    check_url_syntax(url)
    if allow_private:
        return
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise UnsafeUrlError(f"the host of {url!r} does not resolve: {error}") from None
    for info in infos:
        address = str(info[4][0])
        if is_private_address(address):
            raise UnsafeUrlError(
                f"{url!r} resolves to {address}, a private or loopback address; "
                "set BISIK_ALLOW_PRIVATE_URLS=true only where that is intended"
            )
