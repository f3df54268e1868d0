"""Callback URLs: where a job's webhook may go.

A caller names a URL; imagepub's workers then POST to it from inside the network. So a URL
whose host is, or resolves to, a loopback, private, link-local or otherwise internal address is
refused (server-side request forgery), unless the operator listed that host in
``webhooks.allowed_hosts``. Checked at submission and again just before each delivery (the
name may resolve differently by then); a delivery then connects to the very addresses that
passed the check, never resolving the name a second time (DNS rebinding).
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit


class CallbackRefused(ValueError):
    pass


class CallbackUnresolvable(CallbackRefused):
    """The host does not resolve (now): DNS trouble may pass, so a delivery tries again later."""


def _internal(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_multicast


def check_callback_url(
    url: str, allowed_hosts: tuple[str, ...] | list[str], *, must_resolve: bool = False, resolve=socket.getaddrinfo,
) -> list[tuple[int, tuple]]:
    """Raise :class:`CallbackRefused` when ``url`` may not receive webhooks (with
    ``must_resolve``, :class:`CallbackUnresolvable` when its host does not resolve). Returns the
    ``(family, sockaddr)`` pairs the host resolved to, every one checked, for a delivery to
    connect to (none when nothing was resolved). ``resolve`` is ``getaddrinfo`` or one with the
    same signature (a delivery passes one bounded by its deadline)."""
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise CallbackRefused("must be an http or https URL with a host")
    if parts.username or parts.password:
        raise CallbackRefused("must not carry credentials")
    host = parts.hostname.lower().rstrip(".")
    allowed = host in {h.lower() for h in allowed_hosts}
    if allowed and not must_resolve:
        return []
    try:
        infos = resolve(host, parts.port or (443 if parts.scheme == "https" else 80), proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError, ValueError):
        # Not resolvable now (DNS trouble, a name that appears later): nothing internal to
        # refuse yet. Delivery checks again, and tries later if it still does not resolve.
        if must_resolve:
            raise CallbackUnresolvable(f"host {host!r} does not resolve") from None
        return []
    for *_, sockaddr in infos:
        if not allowed and _internal(sockaddr[0]):
            raise CallbackRefused(
                f"host {host!r} resolves to the internal address {sockaddr[0]}; "
                "an operator can allow it in webhooks.allowed_hosts"
            )
    return [(family, sockaddr) for family, *_, sockaddr in infos]
