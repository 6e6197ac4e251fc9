"""The SMTP session's view of the DSN parameters (RFC 3461): which MAIL parameters are
DSN's, the octets they add to a command line, and MAIL/RCPT parameters folded into
MailDsn/RcptDsn. The parsing itself is relay.dsnparams, shared with delivery.
"""

from __future__ import annotations

from relay.dsnparams import MAX_ENVID, MAX_ORCPT, parse_envid, parse_notify, parse_orcpt, parse_ret
from relay.model import MailDsn, RcptDsn

MAIL_DSN_PARAMS = ("RET", "ENVID")
# RFC 3461 sections 4.3-4.4 and 5: the octets RET and ENVID add to MAIL, NOTIFY and
# ORCPT to RCPT (RFC 5321 4.5.3.1.4: extensions raise the 512 octet limit)
DSN_MAIL_EXTRA = len(" RET=FULL") + len(" ENVID=") + MAX_ENVID
DSN_RCPT_EXTRA = len(" NOTIFY=SUCCESS,FAILURE,DELAY") + len(" ORCPT=") + MAX_ORCPT


def mail_dsn_param(dsn: MailDsn, key: str, value: str | None) -> MailDsn:
    """dsn with MAIL's RET or ENVID parameter added (checked)."""
    if key == "RET":
        return MailDsn(parse_ret(value), dsn.envid)
    return MailDsn(dsn.ret, parse_envid(value))


def rcpt_dsn_params(params: dict[str, str | None]) -> RcptDsn | None:
    """RCPT's DSN parameters, checked; None when another (unsupported) parameter is there."""
    notify: tuple[str, ...] = ()
    orcpt = ""
    for key, value in params.items():
        if key == "NOTIFY":
            notify = parse_notify(value)
        elif key == "ORCPT":
            orcpt = parse_orcpt(value)
        else:
            return None
    return RcptDsn(notify, orcpt)
