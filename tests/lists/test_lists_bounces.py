"""The bounce reader: RFC 3464 and RFC 5965 examples, plain bounce texts, a bounce that
Debian's Postfix writes, and hypothesis: it never raises and says one of its kinds."""

from __future__ import annotations

import asyncio

import aiosmtplib
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.lab import postfix as pf
from relay.lab.mta import LabMta
from relay.lists.bounces import read_bounce

# RFC 3464 appendix "Simple DSN" (Status 4.0.0 after five days: failed, transient class)
RFC3464_SIMPLE = b"""Date: Thu, 7 Jul 1994 17:16:05 -0400
From: Mail Delivery Subsystem <MAILER-DAEMON@CS.UTK.EDU>
Message-Id: <199407072116.RAA14128@CS.UTK.EDU>
Subject: Returned mail: Cannot send message for 5 days
To: <owner-info-mime@cs.utk.edu>
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status;
    boundary="RAA14128.773615765/CS.UTK.EDU"

--RAA14128.773615765/CS.UTK.EDU

The original message was received at Sat, 2 Jul 1994 17:10:28 -0400
from root@localhost

    ----- The following addresses had delivery problems -----
<louisl@larry.slip.umd.edu>  (unrecoverable error)

--RAA14128.773615765/CS.UTK.EDU
content-type: message/delivery-status

Reporting-MTA: dns; cs.utk.edu

Original-Recipient: rfc822;louisl@larry.slip.umd.edu
Final-Recipient: rfc822;louisl@larry.slip.umd.edu
Action: failed
Status: 4.0.0
Diagnostic-Code: smtp; 426 connection timed out
Last-Attempt-Date: Thu, 7 Jul 1994 17:15:49 -0400

--RAA14128.773615765/CS.UTK.EDU
content-type: message/rfc822

[original message goes here]
--RAA14128.773615765/CS.UTK.EDU--
""".replace(b"\n", b"\r\n")

# RFC 3464 appendix "Multi-Recipient DSN" (abridged to its report part)
RFC3464_MULTI = b"""Date: Fri, 8 Jul 1994 09:21:47 -0400
From: Mail Delivery Subsystem <MAILER-DAEMON@CS.UTK.EDU>
Subject: Returned mail: User unknown
To: <owner-ups-mib@CS.UTK.EDU>
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status;
              boundary="JAA13167.773673707/CS.UTK.EDU"

--JAA13167.773673707/CS.UTK.EDU
content-type: text/plain; charset=us-ascii

   ----- The following addresses had delivery problems -----
<arathib@vnet.ibm.com>  (unrecoverable error)
<wsnell@sdcc13.ucsd.edu>  (unrecoverable error)

--JAA13167.773673707/CS.UTK.EDU
content-type: message/delivery-status

Reporting-MTA: dns; cs.utk.edu

Original-Recipient: rfc822;arathib@vnet.ibm.com
Final-Recipient: rfc822;arathib@vnet.ibm.com
Action: failed
Status: 5.0.0 (permanent failure)
Diagnostic-Code: smtp; 550 'arathib@vnet.IBM.COM' is not a registered gateway user
Remote-MTA: dns; vnet.ibm.com

Original-Recipient: rfc822;johnh@hpnjld.njd.hp.com
Final-Recipient: rfc822;johnh@hpnjld.njd.hp.com
Action: delayed
Status: 4.0.0 (hpnjld.njd.jp.com: host name lookup failure)

Original-Recipient: rfc822;wsnell@sdcc13.ucsd.edu
Final-Recipient: rfc822;wsnell@sdcc13.ucsd.edu
Action: failed
Status: 5.0.0
Diagnostic-Code: smtp; 550 user unknown
Remote-MTA: dns; sdcc13.ucsd.edu

--JAA13167.773673707/CS.UTK.EDU--
""".replace(b"\n", b"\r\n")

# RFC 5965 appendix B.2 (the example report)
RFC5965 = b"""From: <abusedesk@example.com>
Date: Thu, 8 Mar 2005 17:40:36 EDT
Subject: FW: Earn money
To: <abuse@example.net>
MIME-Version: 1.0
Content-Type: multipart/report; report-type=feedback-report;
     boundary="part1_13d.2e68ed54_boundary"

--part1_13d.2e68ed54_boundary
Content-Type: text/plain; charset="US-ASCII"
Content-Transfer-Encoding: 7bit

This is an email abuse report for an email message received from IP
192.0.2.1 on Thu, 8 Mar 2005 14:00:00 EDT.  For more information
about this format please see http://www.mipassoc.org/arf/.

--part1_13d.2e68ed54_boundary
Content-Type: message/feedback-report

Feedback-Type: abuse
User-Agent: SomeGenerator/1.0
Version: 1
Original-Mail-From: <somespammer@example.net>
Original-Rcpt-To: <user@example.com>
Arrival-Date: Thu, 8 Mar 2005 14:00:00 EDT
Reporting-MTA: dns; mail.example.com
Source-IP: 192.0.2.1
Authentication-Results: mail.example.com;
               spf=fail smtp.mail=somespammer@example.com
Reported-Domain: example.net
Reported-Uri: http://example.net/earn_money.html
Reported-Uri: mailto:user@example.com
Removal-Recipient: user@example.com

--part1_13d.2e68ed54_boundary
Content-Type: message/rfc822
Content-Disposition: inline

From: <somespammer@example.net>
To: <Undisclosed Recipients>
Subject: Earn money
List-Unsubscribe: <https://lists.example.org/lists/unsubscribe/0123456789abcdef0123456789abcdef>
MIME-Version: 1.0
Content-type: text/plain
Message-ID: 8787KJKJ3K4J3K4J3K4J3.mail@example.net
Date: Thu, 02 Sep 2004 12:31:03 -0500

Spam Spam Spam
--part1_13d.2e68ed54_boundary--
""".replace(b"\n", b"\r\n")

QMAIL = b"""From: MAILER-DAEMON@mx.example.net
Subject: failure notice

Hi. This is the qmail-send program at mx.example.net.
I'm afraid I wasn't able to deliver your message to the following addresses.

<bob@example.net>:
Remote host said: 550 5.1.1 <bob@example.net>: Recipient address rejected: User unknown
""".replace(b"\n", b"\r\n")

PLAIN_SOFT = b"""From: postmaster@example.net
Subject: Undeliverable: hello

Delivery has failed: 452 mailbox full, try again later
""".replace(b"\n", b"\r\n")


def test_rfc3464_simple_is_soft() -> None:
    r = read_bounce(RFC3464_SIMPLE)
    assert (r.kind, r.status, r.recipients) == ("soft", "4.0.0", ("louisl@larry.slip.umd.edu",))


def test_rfc3464_multi_is_hard_for_the_failed_ones() -> None:
    r = read_bounce(RFC3464_MULTI)
    assert r.kind == "hard" and r.status == "5.0.0"
    assert r.recipients == ("arathib@vnet.ibm.com", "wsnell@sdcc13.ucsd.edu")


def test_rfc5965_abuse_and_the_token_in_the_original() -> None:
    r = read_bounce(RFC5965)
    assert r.kind == "abuse" and r.recipients == ("user@example.com",)
    assert r.token == "0123456789abcdef0123456789abcdef"


def test_plain_texts() -> None:
    assert read_bounce(QMAIL).kind == "hard" and read_bounce(QMAIL).status == "5.1.1"
    assert read_bounce(PLAIN_SOFT).kind == "soft"
    assert read_bounce(b"Subject: hi\r\n\r\nsee you at 550 Main St\r\n").kind == "none"
    delayed = RFC3464_MULTI.replace(b"Action: failed", b"Action: delayed")
    assert read_bounce(delayed).kind == "none"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000))
def test_fuzz_bytes_never_raise(data: bytes) -> None:
    assert read_bounce(data).kind in ("hard", "soft", "abuse", "none")


_lines = st.lists(
    st.sampled_from(
        [
            b"Content-Type: multipart/report; report-type=delivery-status; boundary=b",
            b"Content-Type: multipart/report; report-type=feedback-report; boundary=b",
            b"content-type: message/delivery-status",
            b"content-type: message/feedback-report",
            b"--b",
            b"--b--",
            b"",
            b"Action: failed",
            b"Status: 5.1.1",
            b"Status: 4.",
            b"Final-Recipient: rfc822;",
            b"Final-Recipient: x@y",
            b"Feedback-Type: abuse",
            b"Subject: Undeliverable",
            b"550 user unknown",
            b"\xff\xfe",
            b" folded",
        ]
    )
    | st.binary(max_size=40),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(_lines)
def test_fuzz_report_shaped_never_raise(lines: list[bytes]) -> None:
    r = read_bounce(b"\r\n".join(lines))
    assert r.kind in ("hard", "soft", "abuse", "none")
    assert all(isinstance(a, str) for a in r.recipients)


@pytest.mark.postfix
async def test_a_bounce_postfix_writes() -> None:
    """Debian's Postfix relays a message to an MX that refuses the recipient (550 5.1.1)
    and bounces it to the VERP sender; its DSN, received by the same MX, reads as a hard
    bounce for that recipient."""
    assert pf.available(), "needs Debian's postfix and root (scripts/debian-packages)"
    mta = await LabMta("127.0.0.22", 0).start()
    mta.refuse_rcpt("nobody@bounce.test", "550 5.1.1 <nobody@bounce.test>: no such user")
    listen = ("127.0.0.21", pf.free_port("127.0.0.21"))
    spec = pf.PostfixSpec(listen=listen, nexthop=("127.0.0.22", mta.port))
    from tests.interop.postfix_lab import start_postfix, stop_postfix

    inst = await start_postfix(spec, "lists-bounce")
    try:
        token = "a" * 32
        async with aiosmtplib.SMTP(hostname=listen[0], port=listen[1], timeout=10) as c:
            await c.sendmail(
                f"dev-bounces+{token}@lists.lab.test",
                ["nobody@bounce.test"],
                b"From: dev@lists.lab.test\r\nTo: nobody@bounce.test\r\nSubject: x\r\n\r\nx\r\n",
            )
        got = await mta.wait_for(1, timeout=30)
        assert list(got[0].rcpt_tos) == [f"dev-bounces+{token}@lists.lab.test"]
        assert got[0].mail_from == ""
        r = read_bounce(got[0].data)
        assert r.kind == "hard", (r, got[0].data[:2000])
        assert r.status == "5.1.1" and r.recipients == ("nobody@bounce.test",)
    finally:
        await stop_postfix(inst)
        await mta.stop()
        await asyncio.sleep(0)
