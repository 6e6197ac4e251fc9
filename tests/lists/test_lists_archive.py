"""The web archive: every copy of a post to a public-archive list carries List-Archive
(RFC 2369 3.6) and Archived-At (RFC 5064) under the list's DKIM signature; the index
(newest first, paged), a post's page (escaped: markup in Subject, From and body stays
text; HTML parts never rendered; attachments by name) and its raw download; "private"
keeps the mbox only. Driven by a real headless Chromium too."""

from __future__ import annotations

import asyncio
import email
import re
import shutil
from pathlib import Path
from typing import Any

import aiohttp
import dkim
import pytest

from relay.commands.keygen import generate
from relay.config import Config, HostPort, parse_config
from relay.dns import StaticResolver
from relay.errors import ConfigError
from relay.http_server import HttpServer
from relay.lists import members as db
from relay.lists.service import ListService
from relay.model import Envelope
from tests.lists.test_lists_http import _chromium
from tests.pg.backends import QueueBackend

LIST = "dev@lists.example.org"
PRIVATE = "quiet@lists.example.org"
BASE = "https://lists.example.org"
XSS = "<script>window.__xss=1</script><img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def key() -> Any:
    return generate("rsa")


def _config(tmp_path: Path, key: Any, **extra: Any) -> Config:
    kp = tmp_path / "k.pem"
    kp.write_bytes(key.private_pem)
    return parse_config(
        {
            "storage": {"path": str(tmp_path / "s.sqlite3")},
            "lists": {
                LIST: {
                    "owners": ["owner@example.org"],
                    "name": "Developers",
                    "posting": "anyone",
                    **extra,
                },
                PRIVATE: {
                    "owners": ["owner@example.org"],
                    "archive": "private",
                    "posting": "anyone",
                },
            },
            "lists_http": {"base_url": BASE},
            "arc": {"enabled": False},
            "dkim": {
                "sign": [{"domain": "lists.example.org", "selector": "s", "private_key": str(kp)}]
            },
        },
        tmp_path / "config.toml",
    )


@pytest.fixture
async def served(tmp_path: Path, key: Any, queue_backend: QueueBackend) -> Any:
    """The archive over a list service on SQLite and on PostgreSQL (parametrised)."""
    config = _config(tmp_path, key)
    raw = await queue_backend.lists_store()
    resolver = StaticResolver({("_dmarc.author.test", "TXT"): ["v=DMARC1; p=none"]})
    svc = ListService(config, raw, resolver=resolver)
    store = svc.store
    svc.spool = queue_backend.spool_of(raw)  # for the tests' look at the queue
    server = HttpServer(config, svc)
    await server.start((HostPort("127.0.0.1", 0),))
    host, port = server.bound[0]
    for lst in (LIST, PRIVATE):
        await store.write(lambda c, lst=lst: db.add_member(c, lst, "b@one.test", 1.0))
    yield svc, store, f"http://{host}:{port}"
    await svc.wait_idle()
    await server.stop()


def post(
    subject: str = "plan", frm: str = "Alice <alice@author.test>", body: str = "body"
) -> bytes:
    return (
        f"From: {frm}\r\nTo: {LIST}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{abs(hash(subject))}@author.test>\r\n"
        "Date: Mon, 23 Nov 2026 10:00:00 +0000\r\n\r\n"
        f"{body}\r\n"
    ).encode()


MIXED = (
    b"From: Alice <alice@author.test>\r\nTo: dev@lists.example.org\r\nSubject: parts\r\n"
    b"Message-ID: <parts@author.test>\r\nMIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
    b"--b\r\nContent-Type: multipart/alternative; boundary=a\r\n\r\n"
    b"--a\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nthe text part\r\n"
    b"--a\r\nContent-Type: text/html\r\n\r\n<b id=rendered>HTML PART</b>"
    b"<script>window.__xss=2</script>\r\n--a--\r\n"
    b"--b\r\nContent-Type: application/pdf\r\n"
    b'Content-Disposition: attachment; filename="<b>plan</b>.pdf"\r\n'
    b"Content-Transfer-Encoding: base64\r\n\r\nJVBERi0=\r\n--b--\r\n"
)


async def copies(svc: Any) -> list[bytes]:
    spool = svc.spool
    out = []
    for m in await spool.list():
        loaded = await spool.load(m.id)
        assert loaded is not None
        out.append(loaded[1])
    return out


def test_archive_setting(tmp_path: Path, key: Any) -> None:
    c = _config(tmp_path, key)
    assert c.lists[LIST].archive and c.lists[LIST].archive_public
    assert c.lists[PRIVATE].archive and not c.lists[PRIVATE].archive_public
    off = _config(tmp_path, key, archive=False).lists[LIST]
    assert not off.archive and not off.archive_public
    for bad in ("public", 1, "yes"):
        with pytest.raises(ConfigError, match=r'archive.*true, false or "private"'):
            _config(tmp_path, key, archive=bad)


async def test_copies_carry_list_archive_and_archived_at_under_dkim(served: Any, key: Any) -> None:
    svc, store, base = served
    forged = post("plan").replace(
        b"Subject:", b"Archived-At: <https://evil.example/x>\r\nSubject:", 1
    )
    await svc.receive(Envelope("alice@author.test", (LIST,)), LIST, forged, "Q1")
    await svc.receive(Envelope("alice@author.test", (PRIVATE,)), PRIVATE, post("quiet"), "Q2")
    await svc.wait_idle()
    got = await copies(svc)
    assert len(got) == 2
    public = next(c for c in got if b"List-Id: Developers" in c or b"dev.lists" in c)
    private = next(c for c in got if c is not public)
    msg = email.message_from_bytes(public)
    assert msg["List-Archive"] == f"<{BASE}/lists/archive/dev.lists.example.org/>"
    assert msg.get_all("Archived-At") == [f"<{BASE}/lists/archive/dev.lists.example.org/Q1>"]
    sig = msg["DKIM-Signature"]
    h = re.search(r"h=([^;]+)", re.sub(r"\s+", "", sig))
    assert h is not None
    signed = h.group(1).lower().split(":")
    assert signed.count("list-archive") == 2 and signed.count("archived-at") == 2  # oversigned

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        assert name == b"s._domainkey.lists.example.org."
        return key.record().encode()

    assert dkim.verify(public, dnsfunc=dnsfunc)
    # a second Archived-At added later breaks the signature (oversigned)
    tampered = public.replace(b"Subject:", b"Archived-At: <https://evil.example/y>\r\nSubject:", 1)
    assert not dkim.verify(tampered, dnsfunc=dnsfunc)
    # private: no web archive, no fields; the post is still kept for the mbox export
    assert b"List-Archive:" not in private and b"Archived-At:" not in private
    kept = await store.read(lambda c: db.archived(c, PRIVATE))
    assert len(kept) == 1
    async with aiohttp.ClientSession() as http:
        for path in ("quiet.lists.example.org/", "quiet/", "quiet.lists.example.org/Q2"):
            async with http.get(f"{base}/lists/archive/{path}") as r:
                assert r.status == 404
        # the archived copy is the one distributed, its Archived-At included
        async with http.get(f"{base}/lists/archive/dev.lists.example.org/Q1/raw") as r:
            assert r.status == 200 and r.content_type == "message/rfc822"
            assert "attachment" in r.headers["Content-Disposition"]
            raw = await r.read()
        assert b"Archived-At: <https://lists.example.org/lists/archive/" in raw
        assert b"evil.example" not in raw and b"List-Unsubscribe:" not in raw


async def test_index_paged_newest_first_and_lookup_by_message_id(served: Any) -> None:
    svc, store, base = served
    for i in range(55):
        data = post(f"post {i:02d}")
        await store.write(
            lambda c, i=i, data=data: db.archive(
                c, LIST, "a@x", data, 1.8e9 + i, f"P{i:02d}", f"mid{i}@author.test"
            )
        )
    async with aiohttp.ClientSession() as http:
        for name in ("dev.lists.example.org", LIST, "dev"):  # List-Id, address, local part
            async with http.get(f"{base}/lists/archive/{name}/") as r:
                assert r.status == 200
                page1 = await r.text()
        subjects = re.findall(r">post (\d\d)<", page1)
        assert subjects == [f"{i:02d}" for i in range(54, 4, -1)]  # 50, newest first
        assert 'href="/lists/archive/dev.lists.example.org/?page=2"' in page1
        async with http.get(f"{base}/lists/archive/dev/?page=2") as r:
            page2 = await r.text()
        assert re.findall(r">post (\d\d)<", page2) == ["04", "03", "02", "01", "00"]
        assert "page=1" in page2 and "page=3" not in page2
        for bad in ("?page=0", "?page=x", "?page=9"):
            async with http.get(f"{base}/lists/archive/dev/{bad}") as r:
                assert r.status == 404
        async with http.get(f"{base}/lists/archive/dev/mid7@author.test") as r:
            assert r.status == 200 and "<h1>post 07</h1>" in await r.text()
        async with http.get(f"{base}/lists/archive/dev/<mid7@author.test>") as r:
            assert r.status == 200
        async with http.get(f"{base}/lists/archive/dev/nope") as r:
            assert r.status == 404
        async with http.get(f"{base}/lists/archive/nolist/") as r:
            assert r.status == 404


async def test_post_page_escapes_everything(served: Any) -> None:
    svc, store, base = served
    evil = post(XSS, frm=f'"{XSS}" <alice@author.test>', body=f"{XSS}\r\n</pre><b>x</b>")
    await store.write(lambda c: db.archive(c, LIST, "a@x", evil, 1.8e9, "EVIL", "evil@x"))
    await store.write(lambda c: db.archive(c, LIST, "a@x", MIXED, 1.8e9, "MIXED", "m@x"))
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/lists/archive/dev/EVIL") as r:
            text = await r.text()
            assert "script-src" not in r.headers["Content-Security-Policy"]
            assert r.headers["Content-Security-Policy"].startswith("default-src 'none'")
        async with http.get(f"{base}/lists/archive/dev/") as r:
            index = await r.text()
        async with http.get(f"{base}/lists/archive/dev/MIXED") as r:
            mixed = await r.text()
    for page_text in (text, index):
        assert "<script" not in page_text and "<img" not in page_text
        assert "&lt;script&gt;window.__xss=1&lt;/script&gt;" in page_text
    assert "&lt;/pre&gt;&lt;b&gt;x&lt;/b&gt;" in text
    assert "the text part" in mixed
    assert "HTML PART" not in mixed and "rendered" not in mixed and "<script" not in mixed
    assert "An HTML part is not shown" in mixed
    assert "&lt;b&gt;plan&lt;/b&gt;.pdf" in mixed and "JVBERi0" not in mixed


async def test_the_archive_in_a_real_browser(served: Any) -> None:
    """Chromium opens the index, follows the link to a post whose Subject is markup, and
    sees that Subject as text: no script ran, no element was injected."""
    assert shutil.which("chromedriver"), "needs Debian's chromium-driver (scripts/debian-packages)"
    svc, store, base = served
    await svc.receive(Envelope("alice@author.test", (LIST,)), LIST, post(XSS, body=XSS), "QX")
    await svc.wait_idle()

    def browse() -> tuple[str, str, str, object, int, int]:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        driver = _chromium()
        try:
            driver.set_page_load_timeout(20)
            driver.get(f"{base}/lists/archive/dev.lists.example.org/")
            index_title = str(driver.title)
            link = driver.find_element(By.CSS_SELECTOR, "tbody a")
            link_text = str(link.text)
            link.click()
            WebDriverWait(driver, 20).until(lambda d: "/QX" in d.current_url)
            h1 = str(driver.find_element(By.TAG_NAME, "h1").text)
            xss = driver.execute_script("return window.__xss === undefined ? null : 1")
            scripts = len(driver.find_elements(By.TAG_NAME, "script"))
            imgs = len(driver.find_elements(By.TAG_NAME, "img"))
            return index_title, link_text, h1, xss, scripts, imgs
        finally:
            driver.quit()

    title, link_text, h1, xss, scripts, imgs = await asyncio.to_thread(browse)
    assert title == "Developers archive"
    assert link_text == XSS and h1 == XSS  # the markup shown as the text it is
    assert xss is None and scripts == 0 and imgs == 0
