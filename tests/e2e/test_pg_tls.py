"""The PostgreSQL store over TCP with TLS (`?sslmode=verify-full&sslrootcert=CA` in
``storage.url``, asyncpg's own options): the test cluster listens on 127.0.0.1 with a
certificate from a test CA. The session is encrypted, a certificate from another CA is
refused before any password is sent, and a `relay serve` node on such a URL delivers."""

from __future__ import annotations

import urllib.parse
from pathlib import Path

import pytest
import trustme

from relay.errors import StoreError
from relay.lab.mta import LabMta
from relay.pgstore import PgStore
from relay.queue.pgspool import PgSpool
from relay.queue.spool import NewMessage
from tests.e2e.pgharness import Node, mids, submit
from tests.pg.pgcluster import PASSWORD, PgCluster
from tests.queue.test_scheduler import MSG, Clock


def _db(url: str) -> str:
    return urllib.parse.urlsplit(url).path.strip("/")


async def test_the_store_over_verified_tls(pg_cluster: PgCluster, pg_url: str) -> None:
    url = pg_cluster.tls_url(_db(pg_url))
    async with PgStore(url, PASSWORD) as store:
        ssl, version = await store.read(
            lambda c: c.fetchrow(
                "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
            )
        )
        assert ssl is True and version.startswith("TLS")
        spool = await PgSpool.open(store, Clock())
        qid = await spool.enqueue(NewMessage("a@example.com", ("b@x.org",), MSG))
        assert [m.id for m in await spool.list()] == [qid]


async def test_a_certificate_of_another_ca_is_refused(
    pg_cluster: PgCluster, pg_url: str, tmp_path: Path
) -> None:
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    url = pg_cluster.tls_url(_db(pg_url), ca=other)
    with pytest.raises(StoreError, match="(?i)certificate verify failed") as err:
        await PgStore(url, PASSWORD, connect_timeout=5).open()
    assert PASSWORD not in str(err.value)


async def test_a_node_on_a_tls_url_delivers(
    tmp_path: Path, pg_cluster: PgCluster, pg_url: str, lab_dns: tuple[str, int]
) -> None:
    dns, mx_port = lab_dns
    node = Node(tmp_path, "tls-node", pg_cluster.tls_url(_db(pg_url)), dns, mx_port)
    async with LabMta("127.0.0.2", mx_port, hostname="mx.dest.test") as mx:
        await node.start()
        try:
            assert await submit(node.port, "over-tls") == 250
            await mx.wait_for(1, timeout=15)
            assert mids(mx) == ["<over-tls@sender.test>"]
        finally:
            node.kill()
