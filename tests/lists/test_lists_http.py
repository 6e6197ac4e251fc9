"""The lists' HTTP pages: RFC 8058 one-click POST (200, no redirect), GET never
unsubscribes, confirm and subscribe, 404 for bad tokens, no membership leak; the GET page
driven in a real headless Chromium that presses its button."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from relay.config import Config, HostPort, parse_config
from relay.http_server import HttpServer
from relay.lists import members as db
from relay.lists.service import ListService
from relay.lists.tx import ListsDb
from tests.pg.backends import QueueBackend

LIST = "dev@lists.example.org"


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return parse_config(
        {
            "storage": {"path": str(tmp_path / "s.sqlite3")},
            "lists": {LIST: {"owners": ["owner@example.org"], "name": "Developers"}},
            "lists_http": {"base_url": "https://lists.example.org"},
            "arc": {"enabled": False},
        },
        tmp_path / "config.toml",
    )


@pytest.fixture
async def served(config: Config, queue_backend: QueueBackend) -> Any:
    """The pages over a list service on SQLite and on PostgreSQL (parametrised)."""
    raw = await queue_backend.lists_store()
    svc = ListService(config, raw)
    store = svc.store
    server = HttpServer(config, svc)
    await server.start((HostPort("127.0.0.1", 0),))
    host, port = server.bound[0]
    await store.write(lambda c: db.add_member(c, LIST, "b@one.test", 1.0))
    await store.write(lambda c: db.add_member(c, LIST, "c@two.test", 1.0))
    svc.spool = queue_backend.spool_of(raw)  # for the tests' look at the queue
    yield svc, store, f"http://{host}:{port}"
    await server.stop()


async def _member(store: ListsDb, addr: str) -> db.Member | None:
    return await store.read(lambda c: db.get_member(c, LIST, addr))


async def test_one_click_post_unsubscribes_exactly_that_member(served: Any) -> None:
    assert shutil.which("chromedriver"), "needs Debian's chromium-driver (scripts/debian-packages)"
    svc, store, base = served
    b = await _member(store, "b@one.test")
    assert b is not None
    url = f"{base}/lists/unsubscribe/{b.token}"
    async with aiohttp.ClientSession() as http:
        async with http.get(url, allow_redirects=False) as r:
            assert r.status == 200 and "<button" in await r.text()
            assert r.headers["Referrer-Policy"] == "no-referrer"
        assert await _member(store, "b@one.test") is not None  # GET never unsubscribes
        async with http.post(
            url,
            data="List-Unsubscribe=One-Click",
            allow_redirects=False,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        ) as r:
            assert r.status == 200  # RFC 8058 3.1: no redirect
        assert await _member(store, "b@one.test") is None
        assert await _member(store, "c@two.test") is not None
        async with http.post(url, data="List-Unsubscribe=One-Click") as r:
            assert r.status == 404  # spent
        bad = f"{base}/lists/unsubscribe/{'0' * 32}"
        async with http.get(bad) as r:
            assert r.status == 404 and "unknown" in await r.text()
        async with http.post(f"{base}/lists/unsubscribe/nothex") as r:
            assert r.status == 404
        c = await _member(store, "c@two.test")
        assert c is not None
        async with http.post(f"{base}/lists/unsubscribe/{c.token}", data="x=y") as r:
            assert r.status == 400
        assert await _member(store, "c@two.test") is not None


async def test_subscribe_form_and_confirm_link(served: Any, config: Config) -> None:
    svc, store, base = served
    spool = svc.spool
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/lists/subscribe/{LIST}") as r:
            assert r.status == 200 and 'name="address"' in await r.text()
        async with http.get(f"{base}/lists/subscribe/nolist@lists.example.org") as r:
            assert r.status == 404
        answers = []
        for addr in ("new@three.test", "c@two.test"):  # a stranger and a member: same answer
            async with http.post(f"{base}/lists/subscribe/{LIST}", data={"address": addr}) as r:
                answers.append((r.status, await r.text()))
        assert answers[0] == answers[1]
        msgs = await spool.list()
        assert [m.recipients[0].address for m in msgs] == ["new@three.test"]
        loaded = await spool.load(msgs[0].id)
        assert loaded is not None
        text = loaded[1].decode()
        token = text.split("/lists/confirm/")[1][:32]
        url = f"{base}/lists/confirm/{token}"
        async with http.get(url) as r:
            assert r.status == 200
        m = await _member(store, "new@three.test")
        assert m is not None and m.state == "pending"  # GET does not confirm
        async with http.post(url, allow_redirects=False) as r:
            assert r.status == 200
        m = await _member(store, "new@three.test")
        assert m is not None and m.state == "active"
        async with http.post(url) as r:
            assert r.status == 404


def _chromium() -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(a)
    service = Service(shutil.which("chromedriver") or "/usr/bin/chromedriver")
    return webdriver.Chrome(service=service, options=opts)


async def test_the_page_in_a_real_browser(served: Any) -> None:
    """Chromium loads the GET page (nothing happens), then presses the button: the form's
    POST carries List-Unsubscribe=One-Click and the member is gone."""
    assert shutil.which("chromedriver"), "needs Debian's chromium-driver (scripts/debian-packages)"
    svc, store, base = served
    b = await _member(store, "b@one.test")
    assert b is not None
    url = f"{base}/lists/unsubscribe/{b.token}"

    def browse(step: str) -> str:
        from selenium.webdriver.common.by import By

        driver = _chromium()
        try:
            driver.set_page_load_timeout(20)
            driver.get(url)
            if step == "look":
                return str(driver.title)
            from selenium.webdriver.support.ui import WebDriverWait

            driver.find_element(By.ID, "go").click()
            # the click starts a navigation: wait for the answer page, not the old one
            WebDriverWait(driver, 20).until(lambda d: d.title != "Unsubscribe")
            return str(driver.find_element(By.TAG_NAME, "h1").text)
        finally:
            driver.quit()

    assert await asyncio.to_thread(browse, "look") == "Unsubscribe"
    assert await _member(store, "b@one.test") is not None
    assert await asyncio.to_thread(browse, "press") == "Unsubscribed"
    assert await _member(store, "b@one.test") is None
