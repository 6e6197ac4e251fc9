"""ARC (RFC 8617): chain validation and sealing.

Validation counts the ARC sets and checks their structure (instances 1..N, one AAR,
AMS and AS each, no gaps or duplicates, N <= 50, cv= values in order) before any DNS or
crypto (RFC 8617 section 5.2, threats.md #21); only then are the keys prefetched through
our resolver and the latest AMS and every AS verified by dkimpy's ``ARC.verify`` with
OpenSSL crypto (``fastrsa.FastARC``), in a worker process when an executor is given.

Sealing prepends one ARC set (AAR with our Authentication-Results value, AMS, AS with the
cv from validation) with dkimpy's canonicalisation and OpenSSL signatures. It never seals
over a chain of 50 sets, and seals cv=fail over a broken chain (the AS then covers only
its own set, as dkimpy does).
"""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import dkim
import dkim.crypto
import structlog
from dkim.canonicalization import CanonicalizationPolicy

from relay import metrics
from relay.auth.arcfields import (
    AAR,
    AMS,
    ARC_HEADERS,
    AS,
    aar_dmarc,
    arc_instance,
    sorted_arc_headers,
)
from relay.auth.dkim import MAX_SIGNATURES, verify_dkim_sync
from relay.auth.fastrsa import (
    FastARC,
    PrependView,
    SigningKey,
    canonical_body,
    canonicalize_headers,
    load_signing_key,
)
from relay.auth.keys import (
    KeyRecords,
    fetch_keys,
    header_values,
    key_name,
    key_names,
    signature_tags,
)
from relay.auth.offload import run_crypto_for
from relay.auth.types import ArcCv, ArcResult, DkimResult
from relay.dns import Resolver
from relay.message import Message, ParsedMessage, as_parsed

log = structlog.get_logger("relay.auth.arc")

MAX_INSTANCES = 50  # RFC 8617 section 4.2.1


# ---- structure (no crypto) ----


@dataclass(frozen=True, slots=True)
class ArcSet:
    instance: int
    aar: bytes
    ams: bytes
    seal: bytes
    cv: str  # cv= of the ARC-Seal, lower case
    seal_domain: str
    key_names: tuple[str, ...]  # AMS key, AS key


@dataclass(frozen=True, slots=True)
class ArcStructure:
    """What the header fields alone say: cv none/fail decided here, or the sets to verify."""

    sets: tuple[ArcSet, ...]
    instances: int
    failure: str = ""  # non-empty: the chain is structurally broken (cv=fail)


def arc_structure(message: Message) -> ArcStructure:
    """Check the chain's structure (RFC 8617 sections 4.2.1, 5.2 steps 1-3) without crypto."""
    fields = header_values(message, ARC_HEADERS)
    if not fields:
        return ArcStructure((), 0)
    by_instance: dict[int, dict[bytes, list[bytes]]] = {}
    unreadable = b""
    for name, value in fields:
        inst = arc_instance(name, value)
        if inst is None:
            unreadable = unreadable or name
            continue
        by_instance.setdefault(inst, {}).setdefault(name, []).append(value)
    # the highest instance that can be read counts, junk beside it or not (section 4.2.1)
    top = max(by_instance, default=0)
    if unreadable:
        # section 5.2 step 2: a set that cannot be read breaks the chain (cv=fail)
        return ArcStructure((), top, f"{unreadable.decode()} with a missing or invalid i= tag")
    if top > MAX_INSTANCES:
        return ArcStructure((), top, f"more than {MAX_INSTANCES} ARC sets (i={top})")
    sets: list[ArcSet] = []
    for inst in range(1, top + 1):
        group = by_instance.get(inst)
        if group is None:
            return ArcStructure((), top, f"ARC set i={inst} is missing (gap in the chain)")
        for name in ARC_HEADERS:
            found = len(group.get(name, []))
            if found != 1:
                what = "missing" if found == 0 else "duplicated"
                return ArcStructure((), top, f"{name.decode()} i={inst} is {what}")
        seal_tags = signature_tags(group[AS][0])
        ams_tags = signature_tags(group[AMS][0])
        cv = seal_tags.get(b"cv", b"").decode("ascii", "replace").lower()
        names = tuple(
            key_name(t.get(b"s", b""), t.get(b"d", b""))
            for t in (ams_tags, seal_tags)
            if t.get(b"s") and t.get(b"d")
        )
        sets.append(
            ArcSet(
                inst,
                group[AAR][0],
                group[AMS][0],
                group[AS][0],
                cv,
                seal_tags.get(b"d", b"").decode("ascii", "replace").lower(),
                names,
            )
        )
    latest = sets[-1]
    if latest.cv == "fail":
        return ArcStructure(tuple(sets), top, f"ARC-Seal i={top} reports cv=fail")
    for s in sets:
        want = "none" if s.instance == 1 else "pass"
        if s.cv != want:
            return ArcStructure(
                tuple(sets), top, f"ARC-Seal i={s.instance} has cv={s.cv or '(none)'}, not {want}"
            )
    return ArcStructure(tuple(sets), top)


def merge_auth_results(values: Sequence[str], srv_id: str) -> str:
    """One authres payload from the Authentication-Results values of ``srv_id``
    (RFC 8617 section 4.1.1: the AAR carries all of the ADMD's results)."""
    parts: list[str] = []
    for value in values:
        head, _, rest = value.partition(";")
        words = head.split()
        if not words or words[0].lower() != srv_id.lower():
            continue
        rest = rest.strip().rstrip(";").strip()
        if rest and rest.lower() != "none":
            parts.append(rest)
    return "; ".join([srv_id, *parts]) if parts else f"{srv_id}; none"


# ---- validation ----


def _result(structure: ArcStructure, cv: ArcCv, reason: str, oldest: int = 0) -> ArcResult:
    sets = structure.sets
    return ArcResult(
        cv=cv,
        instances=structure.instances,
        oldest_pass=oldest,
        sealers=tuple(s.seal_domain for s in sets),
        reason=reason,
        first_aar_dmarc=aar_dmarc(sets[0].aar) if sets else "",
    )


def validate_arc_sync(
    message: Message, keys: KeyRecords, structure: ArcStructure | None = None
) -> ArcResult:
    """Validate the chain against prefetched keys (CPU only, no I/O)."""
    message = as_parsed(message)
    structure = structure or arc_structure(message)
    if structure.failure:
        return _result(structure, ArcCv.FAIL, structure.failure)
    if not structure.sets:
        return _result(structure, ArcCv.NONE, "no ARC sets")
    try:
        verifier = FastARC(message)
    except dkim.MessageFormatError as exc:
        return _result(structure, ArcCv.FAIL, f"message header could not be parsed ({exc})")
    cv, data, reason = verifier.verify(dnsfunc=keys.txt)
    if cv != dkim.CV_Pass:
        return _result(structure, ArcCv.FAIL, str(reason))
    # oldest-pass: lowest instance k such that the AMS of k..N all validate
    oldest = structure.instances
    for entry in data:  # ordered from N down to 1
        if not entry.get("ams-valid"):
            break
        oldest = int(entry["instance"])
    return _result(structure, ArcCv.PASS, "", oldest)


async def validate_arc(
    resolver: Resolver, message: Message, *, executor: Executor | None = None
) -> ArcResult:
    """RFC 8617 chain validation: structure first, then keys fetched concurrently through
    resolver, then crypto in executor (inline when None)."""
    message = as_parsed(message)
    structure = arc_structure(message)
    if structure.failure or not structure.sets:
        return validate_arc_sync(message, KeyRecords(), structure)
    names = [n for s in structure.sets for n in s.key_names]
    keys = await fetch_keys(resolver, names)
    return await run_crypto_for(executor, len(message.raw), arc_or_fail, message, keys, structure)


# ---- sealing ----


def _linesep(message: bytes) -> bytes:
    first = message.find(b"\n")
    return b"\r\n" if first <= 0 or message[first - 1 : first] == b"\r" else b"\n"


class ArcSealer:
    """Seals messages with one ARC key (RFC 8617 section 5.1).

    ``min_rsa_bits`` guards against weak keys (2048 by default; the ValiMail suite's key
    has 1024). ``standardize`` emits the ValiMail suite's header form (tags sorted, lower
    case, unfolded); ``clock`` gives t=.
    """

    def __init__(
        self,
        domain: str,
        selector: str,
        private_key_pem: bytes,
        srv_id: str,
        *,
        min_rsa_bits: int = 2048,
        include_headers: Sequence[str] | None = None,
        clock: Callable[[], float] = time.time,
        standardize: bool = False,
        key: SigningKey | None = None,
    ) -> None:
        self.domain = domain.lower().encode("ascii")
        self.selector = selector.encode("ascii")
        self.srv_id = srv_id
        self.key: SigningKey = key or load_signing_key(private_key_pem, min_rsa_bits=min_rsa_bits)
        self.include_headers = tuple(h.lower().encode() for h in include_headers or ())
        self.clock = clock
        self.standardize = standardize

    def seal(
        self,
        message: Message,
        auth_results_value: str,
        chain: ArcResult,
        unsigned: Sequence[bytes] = (),
    ) -> bytes:
        """message with a new ARC set prepended: AAR (``i=N+1; `` + auth_results_value),
        AMS and AS (cv from ``chain``). Unchanged when the chain already has 50 sets.
        ``unsigned``: lower-case field names the AMS leaves out (a list copy's own
        List-Unsubscribe, which the list's DKIM signature covers)."""
        pm = as_parsed(message)
        return pm.prepend(*self.seal_headers(pm, auth_results_value, chain, unsigned)).raw

    def seal_headers(
        self,
        message: Message,
        auth_results_value: str,
        chain: ArcResult,
        unsigned: Sequence[bytes] = (),
    ) -> tuple[bytes, ...]:
        """The new (ARC-Seal, ARC-Message-Signature, ARC-Authentication-Results) lines;
        () when no set is to be added."""
        message = as_parsed(message)
        return self._seal(
            FastARC(message), _linesep(message.raw), auth_results_value, chain, unsigned=unsigned
        )

    def seal_headers_prepended(
        self,
        top: bytes,
        view: PrependView,
        signer: FastARC,
        auth_results_value: str,
        chain: ArcResult,
        unsigned: Sequence[bytes] = (),
    ) -> tuple[bytes, ...]:
        """``seal_headers(top + view.base, ...)``, the same bytes, with the base's parse
        and body hash reused from ``view`` (``view.usual`` must be true; top: whole header
        fields, or b""). ``signer``: a ``FastARC(b"")`` the caller keeps for its messages
        (one thread at a time)."""
        signer.headers, signer.body = view.view(top)
        signer.headers_relaxed = False
        canon = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
        bodyhash = view.bodyhash(canon, self.key.algorithm)
        linesep = _linesep(top if b"\n" in top else top + view.base)  # its first line end
        return self._seal(signer, linesep, auth_results_value, chain, bodyhash, unsigned)

    def _seal(
        self,
        signer: FastARC,
        linesep: bytes,
        auth_results_value: str,
        chain: ArcResult,
        bodyhash: bytes | None = None,
        unsigned: Sequence[bytes] = (),
    ) -> tuple[bytes, ...]:
        signer.linesep = linesep
        canon = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
        signer.headers = canonicalize_headers(canon, signer.headers)  # once, not per signature
        signer.headers_relaxed = True
        top, arc_with_instance = sorted_arc_headers(signer.headers)
        top = max(top, chain.instances)
        if top >= MAX_INSTANCES:
            log.warning("arc_not_sealed", reason=f"chain already has {top} sets")
            return ()
        if top == 0 and any(n.lower() in ARC_HEADERS for n, _ in signer.headers):
            # ARC header fields none of which names an instance: an i=1 set beside them
            # would claim a fresh chain over a broken one (RFC 8617 sections 4.2.1, 5.1)
            log.warning("arc_not_sealed", reason="ARC header fields with no readable i=")
            return ()
        instance = top + 1
        if instance == 1:
            cv = dkim.CV_None
        elif chain.cv == ArcCv.PASS:
            cv = dkim.CV_Pass
        else:
            cv = dkim.CV_Fail  # broken, or not validated: never claim pass
        algorithm = self.key.algorithm
        signer.signature_algorithm = algorithm
        signer.hasher = dkim.crypto.HASH_ALGORITHMS[algorithm]
        signer.add_should_not(("Authentication-Results",))
        include = self.include_headers or tuple(x.lower() for x in signer.default_sign_headers())
        include = tuple(x for x in include if x not in unsigned)
        if b"from" not in include:
            raise ValueError("the From header field must be signed (message has no From?)")
        bad = set(include) & (signer.should_not_sign | set(ARC_HEADERS))
        if bad:
            raise ValueError(f"header fields that must not be signed: {sorted(bad)}")
        arc_headers = [y for _, y in arc_with_instance] if cv != dkim.CV_Fail else []

        value = auth_results_value.strip().encode("utf-8")
        value = re.sub(rb"\r?\n", linesep, value)
        aar = b"i=%d; " % instance + value + linesep
        arc_headers.insert(0, (b"ARC-Authentication-Results", aar))
        signer.headers = canonicalize_headers(canon, arc_headers[:1]) + signer.headers

        if bodyhash is None:
            bodyhash = base64.b64encode(signer.hasher(canonical_body(canon, signer.body)).digest())
        timestamp = str(int(self.clock())).encode("ascii")
        ams_fields = [
            (b"i", str(instance).encode("ascii")),
            (b"a", algorithm),
            (b"c", b"relaxed/relaxed"),
            (b"d", self.domain),
            (b"s", self.selector),
            (b"t", timestamp),
            (b"h", b" : ".join(include)),
            (b"bh", bodyhash),
            (b"b", b"0" * 60),
        ]
        ams = signer.gen_header(
            ams_fields, include, canon, b"ARC-Message-Signature", self.key, self.standardize
        )
        arc_headers.insert(0, (b"ARC-Message-Signature", ams))
        signer.headers = canonicalize_headers(canon, arc_headers[:1]) + signer.headers

        as_fields = [
            (b"i", str(instance).encode("ascii")),
            (b"cv", cv),
            (b"a", algorithm),
            (b"d", self.domain),
            (b"s", self.selector),
            (b"t", timestamp),
            (b"b", b"0" * 60),
        ]
        as_include = [x[0].lower() for x in arc_headers]
        as_include.reverse()
        if cv == dkim.CV_Fail:
            signer.headers.reverse()  # dkimpy: select the newest set's fields only
        seal = signer.gen_header(
            as_fields, as_include, canon, b"ARC-Seal", self.key, self.standardize
        )
        return (
            b"ARC-Seal: " + seal,
            b"ARC-Message-Signature: " + ams,
            b"ARC-Authentication-Results: " + aar,
        )


# ---- off-loop sealing ----


@dataclass(frozen=True, slots=True)
class SealerSpec:
    """Picklable description of an ArcSealer, rebuilt (once) inside each worker."""

    domain: str
    selector: str
    private_key_pem: bytes
    srv_id: str
    min_rsa_bits: int = 2048


_WORKER_SEALERS: dict[SealerSpec, ArcSealer] = {}


def _sealer(spec: SealerSpec) -> ArcSealer:
    sealer = _WORKER_SEALERS.get(spec)
    if sealer is None:
        sealer = ArcSealer(
            spec.domain,
            spec.selector,
            spec.private_key_pem,
            spec.srv_id,
            min_rsa_bits=spec.min_rsa_bits,
        )
        _WORKER_SEALERS[spec] = sealer
    return sealer


def _seal_job(
    spec: SealerSpec, message: ParsedMessage, ar_value: str, chain: ArcResult
) -> tuple[tuple[bytes, ...], float]:
    """The new ARC set's fields and the time the seal took where it ran (the loop, a
    thread or a process of the crypto pool). perf_counter, not thread_time: the job never
    waits, so on a core of its own the two agree, and reading the thread CPU clock cost
    ~0.2 ms a call inside the running relay here (py-spy: 14 % of intake's samples)."""
    started = time.perf_counter()
    headers = _sealer(spec).seal_headers(message, ar_value, chain)
    return headers, time.perf_counter() - started


async def seal_async(
    spec: SealerSpec,
    message: Message,
    auth_results_value: str,
    chain: ArcResult,
    *,
    executor: Executor | None = None,
) -> ParsedMessage:
    """ArcSealer(spec).seal(...) in executor (each worker loads the key once): the
    message with the new set prepended (only the new fields parsed)."""
    pm = as_parsed(message)
    headers, cpu = await run_crypto_for(
        executor, len(pm.raw), _seal_job, spec, pm, auth_results_value, chain
    )
    if headers:  # () when no set is to be added
        metrics.arc_seal(cpu)
    return pm.prepend(*headers)


# ---- DKIM and ARC together: one key prefetch, one trip to the worker ----


def _verify_both_job(
    message: Message, keys: KeyRecords, structure: ArcStructure, now: float | None
) -> tuple[tuple[DkimResult, ...], ArcResult]:
    """Both verdicts, each on its own: DKIM results stand whatever the ARC chain holds
    (an AMS is no DKIM-Signature, RFC 8617 section 4.1.2), so an error while validating
    the chain makes the chain fail and leaves the DKIM results as they were verified."""
    return verify_dkim_sync(message, keys, now), arc_or_fail(message, keys, structure)


def arc_or_fail(message: Message, keys: KeyRecords, structure: ArcStructure) -> ArcResult:
    """validate_arc_sync, any error in it giving cv=fail with the error as the reason:
    RFC 8617 section 5.2, a chain that cannot be validated is not a passing chain."""
    try:
        return validate_arc_sync(message, keys, structure)
    except Exception as exc:  # noqa: BLE001 - a hostile chain must not cost the DKIM verdict
        log.warning("arc_validation_error", error=repr(exc))
        return _result(structure, ArcCv.FAIL, f"ARC set could not be validated ({exc!r})")


async def verify_dkim_and_arc(
    resolver: Resolver,
    message: Message,
    *,
    executor: Executor | None = None,
    now: float | None = None,
) -> tuple[tuple[DkimResult, ...], ArcResult]:
    """verify_dkim and validate_arc in one go: all keys fetched concurrently, then one job."""
    message = as_parsed(message)
    structure = arc_structure(message)
    names = list(key_names(message, (b"dkim-signature",), limit=MAX_SIGNATURES))
    if not structure.failure:
        names += [n for s in structure.sets for n in s.key_names]
    keys = await fetch_keys(resolver, names)
    return await run_crypto_for(
        executor, len(message.raw), _verify_both_job, message, keys, structure, now
    )
