"""Outbound DKIM signing: the one home of the keys (``[[dkim.sign]]``, and the ``[tlsrpt]
dkim_private_key`` alias) for every message the relay writes or rewrites: list copies and
notices, DSNs (when a key for the bounce sender's domain exists), TLS-RPT reports (which
are not sent without one, RFC 8460 section 3).

A message is signed by the entries whose domain is its From domain or the nearest parent
of it that has a key (RFC 6376 section 3.5: d= need only be a parent for relaxed DMARC
alignment, RFC 7489 section 3.1.1); two entries for that domain (RSA and Ed25519, RFC
8463) give two signatures. Signing goes through relay.auth.dkim.DkimSigner.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from relay.auth.dkim import DkimSigner
from relay.auth.fastrsa import FastDKIM, PrependView
from relay.config import Config, DkimSignConfig
from relay.errors import ConfigError

# the fields a DSN's signature covers (RFC 6376 section 5.4.1), From and Subject
# oversigned
DSN_FIELDS = (
    "from",
    "from",
    "to",
    "subject",
    "subject",
    "date",
    "message-id",
    "auto-submitted",
    "mime-version",
    "content-type",
)

# the fields a list copy's signature covers; From twice-listed fields are oversigned so
# nobody can add a second one (RFC 6376 section 8.15)
SIGNED_FIELDS = (
    "from",
    "from",
    "reply-to",
    "cc",
    "to",
    "subject",
    "subject",
    "date",
    "message-id",
    "in-reply-to",
    "references",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "list-id",
    "list-id",
    "list-post",
    "list-help",
    "list-subscribe",
    "list-owner",
    "list-archive",
    "list-archive",
    "archived-at",
    "archived-at",
    "list-unsubscribe",
    "list-unsubscribe",
    "list-unsubscribe-post",
    "list-unsubscribe-post",
    "precedence",
)


def pick_domain(from_domain: str, domains: Sequence[str]) -> str | None:
    """The key domain for a From domain: itself, else its nearest parent with a key
    (never a bare top-level domain)."""
    have = {x.lower() for x in domains}
    labels = from_domain.lower().rstrip(".").split(".")
    for i in range(len(labels) - 1):
        candidate = ".".join(labels[i:])
        if candidate in have:
            return candidate
    return None


class OutboundSigner:
    """The ``[[dkim.sign]]`` keys, loaded once."""

    def __init__(self, signers: Sequence[tuple[str, DkimSigner]]) -> None:
        self._signers = list(signers)
        self._domains: dict[str, str | None] = {}  # From domain -> key domain (pick_domain)

    @classmethod
    def from_config(
        cls,
        config: Config,
        fields: Sequence[str] = SIGNED_FIELDS,
        clock: Callable[[], float] = time.time,
    ) -> OutboundSigner:
        out: list[tuple[str, DkimSigner]] = []
        for i, entry in enumerate(config.dkim_sign):
            out.append((entry.domain, _load(config, i, entry, fields, clock)))
        return cls(out)

    def domain_for(self, from_domain: str) -> str | None:
        if from_domain in self._domains:
            return self._domains[from_domain]
        found = pick_domain(from_domain, [d for d, _ in self._signers])
        if len(self._domains) >= 1024:
            self._domains.clear()
        self._domains[from_domain] = found
        return found

    def covers(self, from_domain: str) -> bool:
        """Whether a message from this domain would be signed."""
        return self.domain_for(from_domain) is not None

    def sign(self, message: bytes, from_domain: str) -> bytes:
        """message with one DKIM-Signature per key of its domain on top (unchanged when
        no key fits)."""
        domain = self.domain_for(from_domain)
        if domain is None:
            return message
        headers = [s.signature_header(message) for d, s in self._signers if d == domain]
        return b"".join(headers) + message

    def signatures_prepended(
        self, top: bytes, view: PrependView, from_domain: str, signer: FastDKIM
    ) -> bytes:
        """The DKIM-Signature lines ``sign(top + view.base, from_domain)`` puts on top, the
        same bytes, the base's parse and body hash reused (relay.auth.fastrsa
        PrependView); b"" when no key fits. ``signer``: a ``FastDKIM(b"")`` kept by the
        caller."""
        domain = self.domain_for(from_domain)
        if domain is None:
            return b""
        return b"".join(
            s.signature_header_prepended(top, view, signer) for d, s in self._signers if d == domain
        )


def domain_of(address: str) -> str:
    """The domain of an address (a bare one or in <...>), lower case; "" when none."""
    return address.strip().strip("<>").rpartition("@")[2].lower().rstrip(".")


def _load(
    config: Config,
    i: int,
    entry: DkimSignConfig,
    fields: Sequence[str],
    clock: Callable[[], float],
) -> DkimSigner:
    key = f"dkim.sign[{i}].private_key"
    try:
        pem = entry.private_key.read_bytes()
        return DkimSigner(entry.domain, entry.selector, pem, include_headers=fields, clock=clock)
    except OSError as exc:
        raise ConfigError(str(config.path), key, f"cannot read: {exc.strerror}") from None
    except Exception as exc:  # noqa: BLE001 - any key problem is a config error
        raise ConfigError(str(config.path), key, str(exc)) from None
