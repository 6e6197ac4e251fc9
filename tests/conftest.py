"""Fixtures every test directory may use: the throwaway PostgreSQL cluster (started only
when a test asks for it) and the queue's two stores as one parametrised fixture."""

from tests.pg.backends import queue_backend, store_backend
from tests.pg.pgbouncer import pg_bouncer, pgb_urls
from tests.pg.pgcluster import pg_cluster, pg_url

__all__ = ["pg_bouncer", "pg_cluster", "pg_url", "pgb_urls", "queue_backend", "store_backend"]
