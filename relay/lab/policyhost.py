"""An HTTPS MTA-STS policy host for the downgrade lab (RFC 8461 section 3.3).

Serves ``GET /.well-known/mta-sts.txt`` for one or more ``mta-sts.<domain>`` names from
one listener (the site is chosen by the Host header, the certificate by whatever the
given SSL context holds -- the lab gives one certificate naming every site). Each site
answers in one of the modes a sender must cope with:

- ``normal``: 200, ``text/plain``, the policy;
- ``404``: 404 Not Found;
- ``redirect``: 301 to another URL (RFC 8461 3.3: redirects MUST NOT be followed);
- ``wrong-content-type``: 200 with the policy as ``text/html`` (3.2: senders SHOULD
  check for ``text/plain``);
- ``oversized``: 200 ``text/plain``, the policy padded with ignorable lines to more than
  64 KiB (3.3: senders may limit the size; ours refuses, it never truncates);
- ``invalid``: 200 ``text/plain``, the policy with an invalid ``mode`` value;
- ``down``: the TLS handshake is aborted (the host is unreachable for HTTPS).

HTTP/1.1, one request per connection, ``Connection: close``. Runs in the caller's event
loop; ``relay lab policy-host`` runs one until Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import re
import ssl
from dataclasses import dataclass
from typing import Any

from relay.lab.tcpserver import LabServer

WELL_KNOWN = "/.well-known/mta-sts.txt"
OVERSIZE_BYTES = 70 * 1024  # over the 64 KiB limit of relay.mtasts
MAX_HEAD = 16 * 1024
READ_TIMEOUT = 10.0


class SiteMode(enum.StrEnum):
    NORMAL = "normal"
    NOT_FOUND = "404"
    REDIRECT = "redirect"
    WRONG_CONTENT_TYPE = "wrong-content-type"
    OVERSIZED = "oversized"
    INVALID = "invalid"
    DOWN = "down"


@dataclass(frozen=True, slots=True)
class Site:
    """One ``mta-sts.<domain>`` site: the policy text and how it is served."""

    policy: str
    mode: SiteMode = SiteMode.NORMAL
    redirect_to: str = "https://policy.attacker.test/.well-known/mta-sts.txt"


@dataclass(frozen=True, slots=True)
class Served:
    """One request the host answered (or refused, status 0 for ``down``)."""

    host: str
    path: str
    status: int
    mode: SiteMode


def invalid_policy(policy: str) -> str:
    """The policy with its ``mode`` value replaced by one RFC 8461 does not define."""
    out, n = re.subn(r"(?mi)^(mode:[ \t]*)\S+", r"\1strict", policy)
    return out if n else policy + "mode: strict\n"


def oversized_policy(policy: str, size: int = OVERSIZE_BYTES) -> str:
    """The policy followed by unknown (so ignorable) keys up to ``size`` bytes."""
    body = policy if policy.endswith("\n") else policy + "\n"
    line = "x-padding: " + "a" * 100 + "\n"
    need = max(0, size - len(body))
    return body + line * (need // len(line) + 1)


def response_for(site: Site | None, path: str) -> tuple[int, str, str, bytes, list[str]]:
    """(status, reason, content type, body, extra headers) for a GET of path."""
    if site is None or path.split("?", 1)[0] != WELL_KNOWN:
        return 404, "Not Found", "text/plain", b"not found\n", []
    m = site.mode
    if m is SiteMode.NOT_FOUND:
        return 404, "Not Found", "text/plain", b"not found\n", []
    if m is SiteMode.REDIRECT:
        body = f"moved to {site.redirect_to}\n".encode()
        return 301, "Moved Permanently", "text/plain", body, [f"Location: {site.redirect_to}"]
    if m is SiteMode.WRONG_CONTENT_TYPE:
        return 200, "OK", "text/html; charset=utf-8", site.policy.encode(), []
    if m is SiteMode.OVERSIZED:
        return 200, "OK", "text/plain", oversized_policy(site.policy).encode(), []
    if m is SiteMode.INVALID:
        return 200, "OK", "text/plain", invalid_policy(site.policy).encode(), []
    return 200, "OK", "text/plain", site.policy.encode(), []


class PolicyHost(LabServer):
    """HTTPS listener on (host, port) serving ``sites`` (name -> Site).

    ``default``: the site served for a Host name not in ``sites`` (None: 404)."""

    def __init__(
        self,
        ssl_context: ssl.SSLContext,
        listen: tuple[str, int] = ("127.0.0.1", 0),
        *,
        sites: dict[str, Site] | None = None,
        default: Site | None = None,
    ) -> None:
        super().__init__(listen)
        self.ssl_context = ssl_context
        self.sites: dict[str, Site] = {k.lower().rstrip("."): v for k, v in (sites or {}).items()}
        self.default = default
        self.served: list[Served] = []
        ssl_context.sni_callback = self._sni

    # ------------------------------------------------------------ sites

    def set(self, name: str, site: Site) -> None:
        self.sites[name.lower().rstrip(".")] = site

    def set_mode(self, name: str, mode: SiteMode) -> None:
        key = name.lower().rstrip(".")
        old = self.sites[key]
        self.sites[key] = Site(old.policy, mode, old.redirect_to)

    def site(self, name: str) -> Site | None:
        return self.sites.get(name.lower().rstrip("."), self.default)

    # ------------------------------------------------------------ lifecycle

    def _server_options(self) -> dict[str, Any]:
        return {"ssl": self.ssl_context, "ssl_handshake_timeout": READ_TIMEOUT}

    # ------------------------------------------------------------ serving

    def _sni(self, sock: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> int | None:
        site = self.site(name or "")
        if site is not None and site.mode is SiteMode.DOWN:
            self.served.append(Served((name or "").lower(), "", 0, SiteMode.DOWN))
            return ssl.ALERT_DESCRIPTION_INTERNAL_ERROR
        return None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.wait_for(self._serve(reader, writer), READ_TIMEOUT)
        except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        except asyncio.CancelledError:
            pass  # stop(): the top of a connection handler
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if len(head) > MAX_HEAD:
            raise ValueError("request head too long")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3:
            raise ValueError("bad request line")
        method, path, _version = parts
        host = ""
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "host":
                host = value.strip().rsplit(":", 1)[0].lower().rstrip(".")
        if not host:
            sslobj = writer.get_extra_info("ssl_object")
            host = (getattr(sslobj, "server_hostname", None) or "").lower()
        site = self.site(host)
        answer: tuple[int, str, str, bytes, list[str]]
        if method != "GET":
            answer = (405, "Method Not Allowed", "text/plain", b"", [])
        else:
            answer = response_for(site, path)
        status, reason, ctype, body, extra = answer
        self.served.append(
            Served(host, path, status, site.mode if site is not None else SiteMode.NOT_FOUND)
        )
        out = [f"HTTP/1.1 {status} {reason}", f"Content-Type: {ctype}"]
        out += extra
        out += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
        writer.write("\r\n".join(out).encode("latin-1") + body)
        await writer.drain()


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A server context from a PEM certificate chain and key (``relay lab policy-host``)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


async def serve(
    listen: tuple[str, int], ssl_context: ssl.SSLContext, policy: str, names: list[str]
) -> None:
    """Run a PolicyHost until cancelled: ``names`` get ``policy`` (none given: any name)."""
    site = Site(policy)
    host = PolicyHost(
        ssl_context,
        listen,
        sites={n: site for n in names},
        default=None if names else site,
    )
    async with host:
        await host.serve_forever()
