"""A mailing-list lab: lab DNS (SPF, DKIM, DMARC for an author domain at p=reject, one at
p=none, the list domain, three member domains), receiving MTAs for the members, and the
config of a relay serving lists with list-domain DKIM and ARC."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from relay.commands.keygen import generate
from relay.lab.dnsserver import LabDnsServer, Zone
from tests.labutil import base_doc

AUTHOR_IP = "127.0.0.5"
MEMBER_IPS = {"one.test": "127.0.0.2", "two.test": "127.0.0.3", "three.test": "127.0.0.6"}
LIST = "dev@lists.lab.test"
PLAIN = "plain@lists.lab.test"


class ListLab:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.zone = Zone()
        self.dns = LabDnsServer(self.zone).start()
        z = self.zone
        for dom, policy in (("author.test", "reject"), ("nopolicy.test", "none")):
            z.add(dom, "TXT", f"v=spf1 ip4:{AUTHOR_IP} -all")
            z.add(f"_dmarc.{dom}", "TXT", f"v=DMARC1; p={policy}")
        self.author_key = self.publish("s1", "author.test")
        self.nopolicy_key = self.publish("s1", "nopolicy.test")
        z.add("lists.lab.test", "TXT", "v=spf1 ip4:127.0.0.1 -all")
        z.add("_dmarc.lists.lab.test", "TXT", "v=DMARC1; p=reject")
        self.list_key = self.publish("s2026", "lists.lab.test")
        self.arc_key = self.publish("arc", "relay.lab.test")
        for dom, ip in MEMBER_IPS.items():
            z.add(dom, "MX", (10, f"mx.{dom}"))
            z.add(f"mx.{dom}", "A", ip)

    def publish(self, selector: str, domain: str) -> bytes:
        key = generate("rsa", 2048)
        self.zone.add(f"{selector}._domainkey.{domain}", "TXT", key.record())
        return key.private_pem

    def txt(self, name: bytes, timeout: int = 5) -> bytes | None:
        recs = self.zone.records.get(name.decode().rstrip(".").lower(), [])
        vals = [v for t, v in recs if t == "TXT"]
        return str(vals[0]).encode() if vals else None

    def doc(
        self, mx_port: int, smtp_port: int = 0, http_port: int = 0, **lists: dict[str, Any]
    ) -> dict[str, Any]:
        work = self.tmp
        (work / "list.pem").write_bytes(self.list_key)
        (work / "arc.pem").write_bytes(self.arc_key)
        doc: dict[str, Any] = base_doc(work, self.dns.address, mx_port)
        doc["server"].update({"listen": [f"127.0.0.1:{smtp_port}"], "hostname": "relay.lab.test"})
        doc["relay"]["local_domains"] = []
        doc["auth"] = {"enabled": True, "crypto_workers": 0}
        doc["arc"] = {
            "enabled": True,
            "domain": "relay.lab.test",
            "selector": "arc",
            "private_key": str(work / "arc.pem"),
        }
        doc["delivery"].update({"retry_first": 0.5, "retry_max": 1, "retry_jitter": 0.0})
        table = {
            LIST: {
                "owners": ["owner@one.test"],
                "name": "Developers",
                "subject_prefix": "[dev]",
                "posting": "anyone",
            },
            PLAIN: {"owners": ["owner@one.test"], "name": "Plain", "posting": "members"},
        }
        for k, v in lists.items():
            table.setdefault(k.replace("_at_", "@"), {}).update(v)
        doc["lists"] = table
        doc["lists_http"] = {"base_url": f"http://127.0.0.1:{http_port or 1}"}
        if http_port:
            doc["http_server"] = {"listen": [f"127.0.0.1:{http_port}"]}
        doc["dkim"] = {
            "sign": [
                {
                    "domain": "lists.lab.test",
                    "selector": "s2026",
                    "private_key": str(work / "list.pem"),
                }
            ]
        }
        return doc

    def close(self) -> None:
        self.dns.stop()


def post(frm: str, to: str, subject: str = "plan", body: str = "The plan.") -> bytes:
    return (
        f"From: Alice Author <{frm}>\r\nTo: {to}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '.')}@{frm.rpartition('@')[2]}>\r\n"
        f"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\n\r\n{body}\r\n"
    ).encode()
