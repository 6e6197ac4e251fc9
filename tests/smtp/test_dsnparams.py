"""RFC 3461 parameter parsing: xtext both ways, NOTIFY/ORCPT/RET/ENVID checks (501 naming
the parameter), and what goes on to a next hop."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.dsnparams import (
    DsnParamError,
    mail_options,
    parse_envid,
    parse_notify,
    parse_orcpt,
    parse_ret,
    rcpt_options,
    wants,
    xtext_decode,
    xtext_encode,
)
from relay.model import MailDsn, RcptDsn
from relay.smtp.dsnparams import rcpt_dsn_params

PRINTABLE = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80)


@given(PRINTABLE)
def test_xtext_round_trip(text: str) -> None:
    enc = xtext_encode(text)
    assert all("!" <= c <= "~" and c != "=" for c in enc)
    assert xtext_decode(enc, "ENVID") == text


@given(st.text(max_size=30))
def test_xtext_decode_never_crashes_and_names_the_parameter(text: str) -> None:
    try:
        out = xtext_decode(text, "ORCPT")
    except DsnParamError as exc:
        assert exc.reply.code == 501 and "bad ORCPT parameter" in exc.reply.message
    else:
        assert all(" " <= c <= "~" for c in out)


def test_notify_values() -> None:
    assert parse_notify("never") == ("NEVER",)
    assert parse_notify("delay,SUCCESS") == ("SUCCESS", "DELAY")  # canonical order
    for bad in (None, "", "NEVER,FAILURE", "FAILURE,FAILURE", "SOMETIMES", "SUCCESS,"):
        with pytest.raises(DsnParamError, match="NOTIFY"):
            parse_notify(bad)


def test_orcpt_ret_envid() -> None:
    assert parse_orcpt("RFC822;a+2Bb@x.test") == "rfc822;a+b@x.test"
    for bad in (None, "a@x.test", ";a@x.test", "rfc822;", "rfc822;a+0Ab", "x" * 501):
        with pytest.raises(DsnParamError, match="ORCPT"):
            parse_orcpt(bad)
    assert parse_ret("hdrs") == "HDRS" and parse_ret("Full") == "FULL"
    with pytest.raises(DsnParamError, match="RET"):
        parse_ret("PART")
    assert parse_envid("id+2B1") == "id+1"
    for bad in (None, "", "x" * 101, "a+2"):
        with pytest.raises(DsnParamError, match="ENVID"):
            parse_envid(bad)


def test_rcpt_params_and_the_next_hop() -> None:
    assert rcpt_dsn_params({}) == RcptDsn()
    assert rcpt_dsn_params({"FOO": "1"}) is None
    got = rcpt_dsn_params({"NOTIFY": "FAILURE", "ORCPT": "rfc822;a+3Db@x.test"})
    assert got == RcptDsn(("FAILURE",), "rfc822;a=b@x.test")
    assert rcpt_options(got) == ["NOTIFY=FAILURE", "ORCPT=rfc822;a+3Db@x.test"]
    assert mail_options(MailDsn("HDRS", "e f")) == ["RET=HDRS", "ENVID=e+20f"]
    assert wants((), "FAILURE", True) and not wants(("NEVER",), "FAILURE", True)
    assert wants(("SUCCESS",), "SUCCESS", False) and not wants((), "SUCCESS", False)
