"""The relay's HTTP listener (``[http_server] listen``): the lists' one-click unsubscribe,
confirm and subscribe pages, served with aiohttp from the relay's event loop (in the
leader process only, when there are several workers: the pages are rare, one process
serves them). ``GET /metrics`` (Prometheus text, every worker summed: relay.metrics) and
``GET /health`` (200 ``{"status": "ok", "pid"}`` while the store answers, else 503) are
always there when the listener is configured.

* ``POST /lists/unsubscribe/TOKEN`` with the body ``List-Unsubscribe=One-Click``
  unsubscribes at once: 200, no redirect (RFC 8058 section 3.1);
* ``GET`` of the same URL shows a page with a button and never unsubscribes (link
  scanners and previews follow GETs, RFC 8058 section 3.1 and 4);
* ``GET /lists/confirm/TOKEN`` shows a button, its ``POST`` subscribes;
* ``GET /lists/subscribe/LIST`` a form; its ``POST`` sends a confirmation (at most one an
  hour per address) and answers the same whatever the address is, so nothing tells a
  visitor whether an address is a member;
* ``GET /lists/archive/LIST/`` the web archive of a list with ``archive = true`` (LIST:
  its List-Id ``dev.lists.example.org``, its address, or its local part): an index,
  newest first, 50 a page (``?page=N``); ``GET /lists/archive/LIST/ID`` one post (ID: the
  last segment of its Archived-At, or its Message-ID) rendered escaped by
  relay.lists.archive; ``.../ID/raw`` the post as distributed, as a message/rfc822
  download;
* an unknown token or list: 404 with a plain message. Pages are small HTML without
  JavaScript; tokens are in the path, so every answer says ``Referrer-Policy: no-referrer``
  and ``Cache-Control: no-store``.
"""

from __future__ import annotations

import asyncio
import html
import os
import re
import sqlite3
import ssl
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from relay import logs, metrics
from relay.config import Config, HostPort

if TYPE_CHECKING:
    from relay.config import ListConfig
    from relay.lists.members import Archived
    from relay.lists.service import ListService

log = logs.get("relay.http_server")

_TOKEN = re.compile(r"[a-f0-9]{32}")
_ADDRESS = re.compile(r"[^@\s<>\"(),;:\\\[\]]{1,64}@[A-Za-z0-9.-]{1,253}")
_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; form-action 'self'; style-src 'unsafe-inline'",
}
ONE_CLICK = "List-Unsubscribe=One-Click"


def page(title: str, body: str, status: int = 200) -> web.Response:
    text = (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width">'
        f"<title>{html.escape(title)}</title></head>\n<body>"
        f"<h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n"
    )
    return web.Response(text=text, status=status, content_type="text/html", headers=_HEADERS)


def not_found() -> web.Response:
    return web.Response(
        text="Not found: this link is unknown or has expired.\n", status=404, headers=_HEADERS
    )


def _button(action: str, label: str, hidden: str = "") -> str:
    return (
        f'<form method="post" action="{html.escape(action)}">{hidden}'
        f'<button type="submit" id="go">{html.escape(label)}</button></form>'
    )


async def _one_click(request: web.Request) -> bool:
    """The body says List-Unsubscribe=One-Click: as a form (the types RFC 8058 section 3.1
    names), or as the bare text some senders post without a form type."""
    if request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        form = await request.post()
        return form.get("List-Unsubscribe") == "One-Click"
    body = await request.read()
    return body.strip() == ONE_CLICK.encode()


class ListsHttp:
    """The /lists/ routes over a ListService."""

    def __init__(self, config: Config, lists: ListService) -> None:
        self.config = config
        self.lists = lists

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/lists/unsubscribe/{token}", self.unsubscribe_page),
            web.post("/lists/unsubscribe/{token}", self.unsubscribe),
            web.get("/lists/confirm/{token}", self.confirm_page),
            web.post("/lists/confirm/{token}", self.confirm),
            web.get("/lists/subscribe/{list}", self.subscribe_page),
            web.post("/lists/subscribe/{list}", self.subscribe),
            web.get("/lists/archive/{list}", self.archive_index),
            web.get("/lists/archive/{list}/", self.archive_index),
            web.get("/lists/archive/{list}/{id}", self.archive_post),
            web.get("/lists/archive/{list}/{id}/raw", self.archive_raw),
        ]

    def _archive_list(self, request: web.Request) -> ListConfig | None:
        """The list named in the path (List-Id, address, or a local part no other list
        has) whose archive is public; None for the rest."""
        from relay.lists.addresses import list_id

        name = request.match_info["list"].lower()
        found = [
            c
            for c in self.config.lists.values()
            if name in (list_id(c), c.address) or name == c.local
        ]
        if len(found) != 1 or not found[0].archive_public:
            return None
        return found[0]

    async def archive_index(self, request: web.Request) -> web.Response:
        from relay.lists import archive
        from relay.lists import members as db
        from relay.lists.addresses import list_id

        cfg = self._archive_list(request)
        raw_page = request.query.get("page", "1")
        if cfg is None or not raw_page.isdigit() or not 0 < int(raw_page) < 10**6:
            return not_found()
        page_no, size = int(raw_page), archive.PAGE_SIZE
        posts, total = await self.lists.store.read(
            lambda c: db.archive_page(c, cfg.address, size, (page_no - 1) * size)
        )
        prefix = f"/lists/archive/{list_id(cfg)}/"
        body = archive.index_body(prefix, posts, total, page_no, size)
        return page(
            f"{cfg.display_name} archive", body, status=200 if posts or page_no == 1 else 404
        )

    async def _archived(self, request: web.Request) -> tuple[ListConfig, Archived] | None:
        from relay.lists import members as db

        cfg = self._archive_list(request)
        if cfg is None:
            return None
        ident = request.match_info["id"].strip("<>")
        post = await self.lists.store.read(lambda c: db.archived_post(c, cfg.address, ident))
        return None if post is None else (cfg, post)

    async def archive_post(self, request: web.Request) -> web.Response:
        from relay.lists import archive
        from relay.lists.addresses import list_id

        got = await self._archived(request)
        if got is None:
            return not_found()
        cfg, post = got
        title, body = archive.post_body(f"/lists/archive/{list_id(cfg)}/", post)
        return page(title, body)

    async def archive_raw(self, request: web.Request) -> web.Response:
        got = await self._archived(request)
        if got is None:
            return not_found()
        name = re.sub(r"[^A-Za-z0-9._-]", "_", got[1].id)[:80]
        headers = {
            **_HEADERS,
            "Content-Disposition": f'attachment; filename="{name}.eml"',
        }
        return web.Response(body=got[1].data, content_type="message/rfc822", headers=headers)

    @staticmethod
    def _token(request: web.Request) -> str | None:
        token = request.match_info["token"].lower()
        return token if _TOKEN.fullmatch(token) else None

    async def unsubscribe_page(self, request: web.Request) -> web.Response:
        token = self._token(request)
        if token is None or not await self.lists.valid_member_token(token):
            return not_found()
        hidden = '<input type="hidden" name="List-Unsubscribe" value="One-Click">'
        return page(
            "Unsubscribe",
            "<p>Press the button to stop receiving this list's mail.</p>"
            + _button(request.path, "Unsubscribe", hidden),
        )

    async def unsubscribe(self, request: web.Request) -> web.Response:
        """RFC 8058 section 3.1: the POST body is exactly List-Unsubscribe=One-Click
        (form-encoded, or multipart/form-data with that one field)."""
        token = self._token(request)
        if token is None:
            return not_found()
        if not await _one_click(request):
            return web.Response(
                text=f"Bad request: the body must be {ONE_CLICK}.\n", status=400, headers=_HEADERS
            )
        if not await self.lists.unsubscribe_token(token):
            return not_found()
        return page("Unsubscribed", "<p>You will get no more mail from this list.</p>")

    async def confirm_page(self, request: web.Request) -> web.Response:
        token = self._token(request)
        if token is None or not await self.lists.valid_confirm_token(token):
            return not_found()
        return page(
            "Confirm your subscription",
            "<p>Press the button to subscribe.</p>" + _button(request.path, "Subscribe"),
        )

    async def confirm(self, request: web.Request) -> web.Response:
        token = self._token(request)
        if token is None or await self.lists.confirm(token) is None:
            return not_found()
        return page("Subscribed", "<p>Your subscription is confirmed.</p>")

    async def subscribe_page(self, request: web.Request) -> web.Response:
        cfg = self.lists.lists.get(request.match_info["list"].lower())
        if cfg is None:
            return not_found()
        form = (
            f'<form method="post" action="{html.escape(request.path)}">'
            '<label for="address">Your address</label> '
            '<input type="email" id="address" name="address" required> '
            '<button type="submit" id="go">Subscribe</button></form>'
        )
        return page(f"Subscribe to {cfg.display_name}", form)

    async def subscribe(self, request: web.Request) -> web.Response:
        cfg = self.lists.lists.get(request.match_info["list"].lower())
        if cfg is None:
            return not_found()
        form = await request.post()
        address = str(form.get("address", "")).strip()
        if not _ADDRESS.fullmatch(address):
            return page("Subscribe", "<p>That is not an e-mail address.</p>", status=400)
        await self.lists.request_subscription(cfg, address)
        return page(
            "Check your mail",
            "<p>If this address can be subscribed, a confirmation message is on its way. "
            "Follow the link in it to finish.</p>",
        )


def make_app(config: Config, lists: ListService | None) -> web.Application:
    app = web.Application(client_max_size=64 * 1024)
    if lists is not None:
        app.add_routes(ListsHttp(config, lists).routes())
    app.add_routes(ops_routes(config))
    return app


def ops_routes(config: Config) -> list[web.RouteDef]:
    """GET /metrics (Prometheus text, every worker summed: relay.metrics) and /health."""
    store = config.storage.path

    async def metrics_page(request: web.Request) -> web.Response:
        body, content_type = await asyncio.to_thread(metrics.render, store)
        resp = web.Response(body=body)
        resp.headers["Content-Type"] = content_type
        return resp

    async def health(request: web.Request) -> web.Response:
        """200 while this process serves and its store answers a read, else 503."""
        ok = await asyncio.to_thread(_store_answers, store)
        return web.json_response(
            {"status": "ok" if ok else "store-unavailable", "pid": os.getpid()},
            status=200 if ok else 503,
        )

    return [web.get("/metrics", metrics_page), web.get("/health", health)]


def _store_answers(store: Path) -> bool:
    try:
        conn = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=2)
        try:
            conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
        finally:
            conn.close()
        return True
    except sqlite3.Error:
        return False


def ssl_context(config: Config) -> ssl.SSLContext | None:
    h = config.http_server
    if h.tls_cert is None or h.tls_key is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(h.tls_cert), str(h.tls_key))
    return ctx


class HttpServer:
    """The listener: ``start()`` binds ``[http_server] listen``; ``bound`` says where."""

    def __init__(self, config: Config, lists: ListService | None) -> None:
        self.config = config
        self.runner = web.AppRunner(make_app(config, lists), access_log=None)
        self.bound: list[tuple[str, int]] = []

    async def start(self, listen: tuple[HostPort, ...] | None = None) -> None:
        await self.runner.setup()
        ctx = ssl_context(self.config)
        for hp in listen if listen is not None else self.config.http_server.listen:
            site = web.TCPSite(self.runner, hp.host, hp.port, ssl_context=ctx)
            await site.start()
            server = site._server  # noqa: SLF001 - aiohttp keeps the asyncio server there
            for sock in getattr(server, "sockets", ()) or ():
                self.bound.append(sock.getsockname()[:2])
        log.info("http_started", listen=[f"{h}:{p}" for h, p in self.bound])

    async def stop(self) -> None:
        await self.runner.cleanup()
