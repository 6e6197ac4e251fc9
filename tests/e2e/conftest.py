"""Fixtures of the end-to-end tests: the lab DNS of the several-nodes tests."""

from tests.e2e.pgharness import lab_dns

__all__ = ["lab_dns"]
