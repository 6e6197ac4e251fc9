"""DKIM signature verification (RFC 6376, RFC 8463 Ed25519, RFC 8301) and DKIM signing.

``verify_dkim`` gives one ``DkimResult`` per DKIM-Signature header: it first learns from
the headers which ``selector._domainkey.domain`` keys are needed, fetches them all
concurrently through our resolver (never dkimpy's DNS), then runs dkimpy's
canonicalisation with OpenSSL crypto (``fastrsa.FastDKIM``) in a worker process when an
executor is given. Each result says why it did not pass, in plain words.

``DkimSigner`` signs a message (relaxed/relaxed, rsa-sha256 or ed25519-sha256), e.g. the
relay's own TLS reports and bounces.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor

import dkim
import dkim.crypto
from dkim.canonicalization import CanonicalizationPolicy

from relay.auth.fastrsa import (
    FastDKIM,
    KeyUnavailable,
    PrependView,
    StrictIdentityError,
    load_signing_key,
)
from relay.auth.keys import KeyRecords, fetch_keys, key_names, signature_tags
from relay.auth.offload import run_crypto_for
from relay.auth.types import DkimResult
from relay.dns import Resolver
from relay.message import Message, as_parsed

_RELAXED_RELAXED = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")  # c= of ours

# Signatures checked per message; the rest get result "policy" (DoS bound, as chasquid).
MAX_SIGNATURES = 5
B_PREFIX = 8  # characters of b= in header.b (RFC 6008)


def _text(value: bytes | None) -> str:
    return (value or b"").decode("ascii", "replace")


def verify_dkim_sync(
    message: Message, keys: KeyRecords, now: float | None = None
) -> tuple[DkimResult, ...]:
    """Verify every DKIM-Signature of message against prefetched keys (CPU only, no I/O)."""
    message = as_parsed(message)
    try:
        verifier = FastDKIM(message, now=now)
    except dkim.MessageFormatError as exc:
        if not message.get_all("dkim-signature"):
            return ()
        return (DkimResult("permerror", reason=f"message header could not be parsed ({exc})"),)
    values = [v for n, v in verifier.headers if n.lower() == b"dkim-signature"]
    results: list[DkimResult] = []
    for idx, value in enumerate(values):
        tags = signature_tags(value)
        base = {
            "domain": _text(tags.get(b"d")).lower(),
            "selector": _text(tags.get(b"s")),
            "b": _text(tags.get(b"b"))[:B_PREFIX],
            "algorithm": _text(tags.get(b"a")).lower(),
        }
        if idx >= MAX_SIGNATURES:
            reason = f"not checked: more than {MAX_SIGNATURES} signatures"
            results.append(DkimResult("policy", reason=reason, **base))
            continue
        if base["algorithm"] == "rsa-sha1":
            reason = "rsa-sha1 signatures are not accepted (RFC 8301)"
            results.append(DkimResult("permerror", reason=reason, **base))
            continue
        results.append(_verify_one(verifier, idx, keys, base))
    return tuple(results)


def _verify_one(verifier: FastDKIM, idx: int, keys: KeyRecords, base: dict[str, str]) -> DkimResult:
    try:
        ok = verifier.verify(idx=idx, dnsfunc=keys.txt)
    except KeyUnavailable as exc:
        return DkimResult("temperror" if exc.temporary else "permerror", reason=str(exc), **base)
    except StrictIdentityError as exc:
        return DkimResult("permerror", reason=str(exc), **base)
    except dkim.ValidationError as exc:
        text = str(exc)
        if text.startswith("body hash mismatch"):
            return DkimResult("fail", reason="body hash mismatch", **base)
        return DkimResult("permerror", reason=f"invalid signature header: {text}", **base)
    except dkim.KeyFormatError as exc:
        return DkimResult("permerror", reason=f"unusable key record: {exc}", **base)
    except dkim.DKIMException as exc:
        return DkimResult("permerror", reason=str(exc), **base)
    if ok and verifier.covered is not None:
        # RFC 6376 sections 3.5 and 8.2: l= lets anyone append unsigned content, so a
        # signature covering less than the body is no pass for DMARC alignment (RFC 7489
        # section 4.2 counts only passing signatures) nor for the ARC override
        signed, total = verifier.covered
        return DkimResult("policy", reason=f"l= covers {signed} of {total} body octets", **base)
    if ok:
        return DkimResult("pass", **base)
    return DkimResult("fail", reason="signature did not verify", **base)


async def verify_dkim(
    resolver: Resolver,
    message: Message,
    *,
    executor: Executor | None = None,
    now: float | None = None,
) -> tuple[DkimResult, ...]:
    """Verify every DKIM signature: keys fetched concurrently through resolver, crypto in
    executor (inline when None). ``now`` fixes the clock for t= / x= checks."""
    message = as_parsed(message)
    names = key_names(message, (b"dkim-signature",), limit=MAX_SIGNATURES)
    keys = await fetch_keys(resolver, names)
    return await run_crypto_for(executor, len(message.raw), verify_dkim_sync, message, keys, now)


def _linesep(message: bytes) -> bytes:
    """The line end a signature is written with: CRLF unless the message uses bare LF."""
    return b"\r\n" if b"\r\n" in message[:1000] or b"\n" not in message else b"\n"


class DkimSigner:
    """Signs messages with one key: DKIM-Signature, relaxed/relaxed, no l= (RFC 8460 safe)."""

    def __init__(
        self,
        domain: str,
        selector: str,
        private_key_pem: bytes,
        *,
        min_rsa_bits: int = 2048,
        clock: Callable[[], float] = time.time,
        include_headers: Sequence[str] | None = None,
    ) -> None:
        self.domain = domain.lower().encode("ascii")
        self.selector = selector.encode("ascii")
        self.key = load_signing_key(private_key_pem, min_rsa_bits=min_rsa_bits)
        self.clock = clock
        self.include_headers = tuple(h.lower().encode() for h in include_headers or ())

    def signature_header(self, message: bytes) -> bytes:
        """The DKIM-Signature header line (CRLF or LF ended, like the message) for message."""
        return self._signature(FastDKIM(message), _linesep(message), None)

    def signature_header_prepended(self, top: bytes, view: PrependView, signer: FastDKIM) -> bytes:
        """``signature_header(top + view.base)``, the same bytes, with the base's parse and
        body hash reused from ``view`` (``view.usual`` must be true). ``signer``: a
        ``FastDKIM(b"")`` the caller keeps for its messages (one thread at a time)."""
        message_start = top + view.base[:1000]
        signer.headers, signer.body = view.view(top)
        canon = _RELAXED_RELAXED
        return self._signature(
            signer, _linesep(message_start), view.bodyhash(canon, self.key.algorithm)
        )

    def _signature(self, signer: FastDKIM, linesep: bytes, bodyhash: bytes | None) -> bytes:
        signer.linesep = linesep
        canon = _RELAXED_RELAXED
        algorithm = self.key.algorithm
        signer.signature_algorithm = algorithm
        signer.hasher = dkim.crypto.HASH_ALGORITHMS[algorithm]
        include = self.include_headers or tuple(x.lower() for x in signer.default_sign_headers())
        if b"from" not in include:
            raise ValueError("the From header field must be signed (message has no From?)")
        if bodyhash is None:
            bodyhash = base64.b64encode(
                signer.hasher(canon.canonicalize_body(signer.body)).digest()
            )
        fields = [
            (b"v", b"1"),
            (b"a", algorithm),
            (b"c", b"relaxed/relaxed"),
            (b"d", self.domain),
            (b"s", self.selector),
            (b"t", str(int(self.clock())).encode("ascii")),
            (b"h", b" : ".join(include)),
            (b"bh", bodyhash),
            (b"b", b"0" * 60),
        ]
        value = signer.gen_header(fields, include, canon, b"DKIM-Signature", self.key)
        return b"DKIM-Signature: " + value

    def sign(self, message: bytes) -> bytes:
        """message with a DKIM-Signature header prepended."""
        return self.signature_header(message) + message
