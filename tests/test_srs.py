"""SRS (libsrs2 scheme): format, SRS0 -> SRS1, reversal, hash and age checks, round trip.

The expected hashes are computed here independently from the libsrs2 definition
(base64(HMAC-SHA1(secret, lower-cased fields concatenated)), first 4 characters).
"""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.srs import SrsError, SrsRewriter, is_srs

DAY = 86400
T0 = 20000 * DAY + 3600  # day 20000: 20000 % 1024 = 544 = 17 * 32 + 0 -> "RA"


def _h(secret: str, *fields: str) -> str:
    mac = hmac.new(secret.encode(), "".join(fields).lower().encode(), hashlib.sha1)
    return base64.b64encode(mac.digest()).decode()[:4]


def _rw(domain: str = "fwd.example.net", secret: str = "s3cret", at: float = T0) -> SrsRewriter:
    return SrsRewriter(domain, secret, now=lambda: at)


def test_srs0_format_and_known_hash() -> None:
    rw = _rw()
    assert rw.timestamp() == "RA"
    out = rw.forward("Alice.Smith@Example.COM")
    want = _h("s3cret", "RA", "Example.COM", "Alice.Smith")
    assert out == f"SRS0={want}=RA=Example.COM=Alice.Smith@fwd.example.net"
    assert is_srs(out)
    assert rw.reverse(out) == "Alice.Smith@Example.COM"


def test_null_and_own_domain_are_not_rewritten() -> None:
    rw = _rw()
    assert rw.forward("") == ""
    assert rw.forward("bob@FWD.example.net") == "bob@FWD.example.net"
    assert rw.forward("postmaster") == "postmaster"


def test_srs0_from_another_forwarder_becomes_srs1_and_back() -> None:
    first = _rw("first.example.org", "other-secret")
    srs0 = first.forward("carol@example.com")
    ours = _rw()
    srs1 = ours.forward(srs0)
    opaque = srs0.rpartition("@")[0][4:]  # "=HHHH=TT=example.com=carol"
    want = _h("s3cret", "first.example.org", opaque)
    assert srs1 == f"SRS1={want}=first.example.org={opaque}@fwd.example.net"
    assert srs1.count("==") == 1
    # a bounce to our SRS1 goes back to the first forwarder's SRS0 address ...
    assert ours.reverse(srs1) == srs0
    # ... which that forwarder reverses to the original sender
    assert first.reverse(srs0) == "carol@example.com"


def test_srs1_is_rewritten_keeping_the_first_forwarder() -> None:
    a = _rw("a.example", "ka")
    b = _rw("b.example", "kb")
    c = _rw("c.example", "kc")
    srs0 = a.forward("dave@example.com")
    srs1_b = b.forward(srs0)
    srs1_c = c.forward(srs1_b)
    assert srs1_c.endswith("@c.example") and "=a.example==" in srs1_c
    assert c.reverse(srs1_c) == srs0  # straight back to the first forwarder
    assert len(srs1_c) == len(srs1_b) - len("b.example") + len("c.example")


def test_hash_is_case_insensitive_and_checked() -> None:
    rw = _rw()
    out = rw.forward("eve@example.com")
    local, _, dom = out.rpartition("@")
    assert rw.reverse(local.lower() + "@" + dom) == "eve@example.com"  # all lower case
    assert rw.reverse(local.upper() + "@" + dom.upper()) == "EVE@EXAMPLE.COM"
    parts = local.split("=")
    parts[1] = "AAAA" if parts[1] != "AAAA" else "BBBB"
    with pytest.raises(SrsError, match="bad hash") as exc:
        rw.reverse("=".join(parts) + "@" + dom)
    assert exc.value.code == 550 and exc.value.reply.startswith("550 5.1.1")
    with pytest.raises(SrsError, match="bad hash"):
        _rw(secret="another").reverse(out)
    tampered = out.replace("=eve@", "=mallory@")
    with pytest.raises(SrsError, match="bad hash"):
        rw.reverse(tampered)


@pytest.mark.parametrize(
    ("days", "ok"), [(0, True), (1, True), (21, True), (22, False), (300, False)]
)
def test_age_limit(days: int, ok: bool) -> None:
    addr = _rw().forward("frank@example.com")
    later = _rw(at=T0 + days * DAY)
    if ok:
        assert later.reverse(addr) == "frank@example.com"
    else:
        with pytest.raises(SrsError, match="expired"):
            later.reverse(addr)


def test_timestamp_wraps_at_1024_days() -> None:
    t = 1023 * DAY + 10  # the last slot before the wrap: "77"
    rw = _rw(at=t)
    assert rw.timestamp() == "77"
    addr = rw.forward("gina@example.com")
    assert _rw(at=t + 5 * DAY).reverse(addr) == "gina@example.com"  # today's slot is 4
    with pytest.raises(SrsError, match="expired"):
        _rw(at=t + 30 * DAY).reverse(addr)
    # 1024 days later the same slot comes round again (10-bit wrap, as libsrs2)
    assert _rw(at=t + 1024 * DAY).reverse(addr) == "gina@example.com"


@pytest.mark.parametrize(
    "address",
    [
        "plain@fwd.example.net",
        "SRS0=abcd@fwd.example.net",
        "SRS0=abcd=RA=example.com@fwd.example.net",
        "SRS1=abcd=host.example@fwd.example.net",
        "SRS0==RA=example.com=x@fwd.example.net",
        "noat",
    ],
)
def test_malformed_addresses_are_refused(address: str) -> None:
    with pytest.raises(SrsError):
        _rw().reverse(address)


def test_bad_timestamp_characters() -> None:
    rw = _rw()
    local = f"{rw.hash('1!', 'example.com', 'x')}=1!=example.com=x"
    with pytest.raises(SrsError, match="bad timestamp"):
        rw.reverse(f"SRS0={local}@fwd.example.net")


def test_is_srs_and_reverse_or_none() -> None:
    rw = _rw()
    assert is_srs("srs0=AbCd=RA=x.example=y@z.example")
    assert is_srs("SRS1+x@y")
    assert not is_srs("SRS0@x.example") and not is_srs("srsx=1@y") and not is_srs("")
    assert rw.reverse_or_none("alice@fwd.example.net") is None
    other = _rw("elsewhere.example").forward("a@example.com")
    assert rw.reverse_or_none(other) is None  # not our SRS domain
    mine = rw.forward("hank@example.com")
    assert rw.reverse_or_none(mine) == "hank@example.com"
    with pytest.raises(SrsError):
        rw.reverse_or_none(mine.replace("=hank@", "=ivan@"))


_local = st.from_regex(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,40}", fullmatch=True)
_domain = st.from_regex(r"[a-z0-9-]{1,20}(\.[a-z0-9-]{1,20}){1,3}", fullmatch=True)


@settings(max_examples=200, deadline=None)
@given(local=_local, domain=_domain, age=st.integers(min_value=0, max_value=21))
def test_round_trip(local: str, domain: str, age: int) -> None:
    rw = _rw()
    address = f"{local}@{domain}"
    out = rw.forward(address)
    assert out.endswith("@fwd.example.net") and is_srs(out)
    back = _rw(at=T0 + age * DAY)
    original = back.reverse(out)
    if local[:4].upper() in ("SRS0", "SRS1") and len(local) > 4 and local[4] in "=+-":
        # an SRS local part is treated as another forwarder's address
        assert original.endswith(f"@{domain}") or original.startswith("SRS0")
    else:
        assert original == address


def test_error_text_and_method_form() -> None:
    rw = _rw()
    assert rw.is_srs("SRS0=a=b=c=d@e.example") and not rw.is_srs("a@e.example")
    with pytest.raises(SrsError) as exc:
        rw.reverse("SRS0=AAAA=RA=example.com=x@fwd.example.net")
    assert str(exc.value) == "bad hash"
    assert exc.value.reply == "550 5.1.1 Invalid SRS address: bad hash"
