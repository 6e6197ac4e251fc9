"""Fixtures for the MTA-STS tests: a lab CA, the real lab DNS server, a real HTTPS policy
host on 127.0.0.2 (one listener, certificate by SNI, answer by Host), a store, a clock."""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme

from relay import pgschema
from relay.config import Config, parse_config
from relay.dns import DnspythonResolver, MxRecord
from relay.http import SafeHttpClient
from relay.lab.dnsserver import LabDnsServer, Zone
from relay.mtasts.manager import PolicyManager
from relay.pgstore import PgStore
from relay.store import Store
from tests.mtasts.sts_https_server import Answer, HttpsServer

POLICY_HOST_IP = "127.0.0.2"
WELL_KNOWN = "/.well-known/mta-sts.txt"


class FreshResolver:
    """The real dnspython resolver, made anew for every query: these tests change the
    zone, and no answer may be kept between queries."""

    def __init__(self, nameserver: str) -> None:
        self.nameserver = nameserver

    def _r(self) -> DnspythonResolver:
        return DnspythonResolver([self.nameserver], timeout=2)

    async def mx(self, name: str) -> list[MxRecord]:
        return await self._r().mx(name)

    async def txt(self, name: str) -> list[str]:
        return await self._r().txt(name)

    async def a(self, name: str) -> list[str]:
        return await self._r().a(name)

    async def aaaa(self, name: str) -> list[str]:
        return await self._r().aaaa(name)

    async def ptr(self, ip: str) -> list[str]:
        return await self._r().ptr(ip)


@dataclass
class Clock:
    now: float = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class StsLab:
    dns: LabDnsServer
    https: HttpsServer
    ca_file: Path
    tmp: Path
    clock: Clock = field(default_factory=Clock)

    @property
    def zone(self) -> Zone:
        return self.dns.zone

    def publish(
        self,
        domain: str,
        policy: str | None,
        policy_id: str = "id1",
        *,
        answer: Answer | None = None,
        txt: str | list[str] | None = None,
    ) -> None:
        """TXT record, policy host address and the policy (or a given answer)."""
        self.zone.set(
            f"_mta-sts.{domain}", "TXT", [txt if txt is not None else f"v=STSv1; id={policy_id}"]
        )
        self.zone.set(f"mta-sts.{domain}", "A", [POLICY_HOST_IP])
        if answer is None:
            answer = Answer(200, (policy or "").encode(), "text/plain")
        self.https.route(f"mta-sts.{domain}", WELL_KNOWN, answer)

    def set_id(self, domain: str, policy_id: str) -> None:
        self.zone.set(f"_mta-sts.{domain}", "TXT", [f"v=STSv1; id={policy_id}"])

    def fetches(self, domain: str) -> int:
        return sum(1 for s in self.https.seen if s.host == f"mta-sts.{domain}")

    def config_text(self, **mta_sts: object) -> str:
        values: dict[str, object] = {"https_port": self.https.port, "fetch_timeout": 5}
        values.update(mta_sts)
        extra = "".join(f"{k} = {_toml(v)}\n" for k, v in values.items())
        return (
            f'[storage]\npath = "{self.tmp / "relay.sqlite3"}"\n'
            f'[dns]\nnameservers = ["{self.dns.address}"]\ntimeout = 2\n'
            f'[delivery]\nca_file = "{self.ca_file}"\n'
            f"[mta_sts]\n{extra}"
            f"[http]\nallow_private_addresses = true\n"
        )

    def config(self, **mta_sts: object) -> Config:
        path = self.tmp / "config.toml"
        text = self.config_text(**mta_sts)
        path.write_text(text)
        return parse_config(tomllib.loads(text), path)

    def resolver(self) -> FreshResolver:
        return FreshResolver(self.dns.address)

    def manager(self, store: Any, **mta_sts: object) -> PolicyManager:
        cfg = self.config(**mta_sts)
        resolver = self.resolver()
        return PolicyManager(
            cfg, resolver, store, SafeHttpClient.from_config(cfg, resolver), self.clock
        )


def _toml(v: object) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else str(v)


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def lab(ca: trustme.CA, tmp_path: Path) -> AsyncIterator[StsLab]:
    ca_file = tmp_path / "lab-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    with lab_dns_server() as dns:
        async with HttpsServer(ca, POLICY_HOST_IP) as https:
            yield StsLab(dns, https, ca_file, tmp_path)


def lab_dns_server() -> LabDnsServer:
    """LabDnsServer picks a free UDP port, then binds TCP to the same number, which
    another process may hold: try a few times."""
    for attempt in range(20):
        try:
            return LabDnsServer(Zone())
        except OSError:
            if attempt == 19:
                raise
    raise AssertionError("unreachable")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "relay.sqlite3").open()
    yield s
    s.close()


@pytest.fixture(params=["sqlite", "postgresql"])
async def sts_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    """The policy cache's store: SQLite, or a fresh database of the throwaway PostgreSQL
    cluster migrated as ``relay serve`` migrates it (relay.pgschema)."""
    if request.param == "sqlite":
        s = Store(tmp_path / "relay.sqlite3").open()
        yield s
        s.close()
        return
    url = request.getfixturevalue("pg_url")
    pg = await new_pg_store(url)
    yield pg
    await pg.close()


async def new_pg_store(url: str) -> PgStore:
    """Another connection pool on the database (another node), migrated."""
    pg = await PgStore(url, os.environ["RELAY_DB_PASSWORD"]).open()
    await pgschema.migrate_all(pg)
    return pg


async def execute(store: Any, sql: str, *args: object) -> None:
    """Run one SQL statement (``?`` placeholders) on either store, outside the cache."""
    if isinstance(store, PgStore):
        n = 0

        def number(_m: re.Match[str]) -> str:
            nonlocal n
            n += 1
            return f"${n}"

        pg_sql = re.sub(r"\?", number, sql)

        async def run(c: Any) -> None:
            await c.execute(pg_sql, *args)

        await store.write(run)
        return
    await store.write(lambda c: c.execute(sql, args))
