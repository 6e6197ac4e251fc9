"""DNSSEC-signed lab zones and an authoritative server for them (loopback, UDP + TCP).

Zones are signed with dnspython's ``dns.dnssec.sign_zone`` (ECDSA P-256, one key with
the SEP flag, an NSEC chain): real signatures that a validating resolver (unbound, see
relay/lab/unbound.py) checks against the lab trust anchor (``SignedZone.trust_anchor``).
A zone may also be served unsigned (an insecure zone, no trust anchor above it), and an
RRset may be made *bogus* after signing (its RRSIG's signature altered), so that the
resolver answers SERVFAIL for it; or a (name, type) may be made to *fail* (``servfail``:
the authority itself answers SERVFAIL, a DNS failure rather than a DNSSEC one).

The server answers authoritatively: the RRset (and its RRSIGs when the query has DO),
CNAMEs in the zone followed, NODATA and NXDOMAIN with the SOA and the NSEC records that
prove them (RFC 4035 section 3.1.3), REFUSED for names outside its zones.
"""

from __future__ import annotations

import datetime
import socket
import socketserver
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

import dns.dnssec
import dns.dnssectypes
import dns.flags
import dns.message
import dns.name
import dns.node
import dns.rcode
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.rdtypes.ANY.RRSIG
import dns.rrset
import dns.zone
from cryptography.hazmat.primitives.asymmetric import ec

LAB_TTL = 60


@dataclass
class SignedZone:
    """One lab zone: ``origin`` and records as (relative or absolute name, type, rdata
    text). ``signed``: DNSSEC-sign it; ``bogus``: (name, type) RRsets whose signature is
    broken after signing; ``servfail``: (name, type) queries the server answers with
    SERVFAIL."""

    origin: str
    records: list[tuple[str, str, str]] = field(default_factory=list)
    signed: bool = True
    bogus: set[tuple[str, str]] = field(default_factory=set)
    servfail: set[tuple[str, str]] = field(default_factory=set)
    zone: dns.zone.Zone | None = None
    trust_anchor: str = ""  # 'origin. DNSKEY 257 3 13 <key>' for unbound's trust-anchor:

    def add(self, name: str, rdtype: str, rdata: str) -> SignedZone:
        self.records.append((name, rdtype, rdata))
        return self

    def build(self) -> dns.zone.Zone:
        origin = self.origin.rstrip(".") + "."
        lines = [
            f"$ORIGIN {origin}",
            f"$TTL {LAB_TTL}",
            f"@ SOA ns.{origin} hostmaster.{origin} 1 3600 600 86400 {LAB_TTL}",
            f"@ NS ns.{origin}",
            "ns A 127.0.0.1",
        ]
        lines += [f"{n} {t} {d}" for n, t, d in self.records]
        zone = dns.zone.from_text("\n".join(lines) + "\n", origin=origin, relativize=False)
        if self.signed:
            key = ec.generate_private_key(ec.SECP256R1())
            dnskey = dns.dnssec.make_dnskey(
                key.public_key(), dns.dnssectypes.Algorithm.ECDSAP256SHA256, flags=257
            )
            now = datetime.datetime.now(datetime.UTC)
            dns.dnssec.sign_zone(
                zone,
                keys=[(key, dnskey)],
                inception=now - datetime.timedelta(hours=1),
                expiration=now + datetime.timedelta(days=7),
                dnskey_ttl=LAB_TTL,
            )
            self.trust_anchor = f"{origin} DNSKEY {dnskey.to_text()}"
            for name, rdtype in self.bogus:
                _break_signature(zone, name, rdtype)
        self.zone = zone
        return zone


def _break_signature(zone: dns.zone.Zone, name: str, rdtype: str) -> None:
    """Alter the signature bytes of the RRSIG covering (name, rdtype)."""
    owner = dns.name.from_text(name, zone.origin)
    node = zone.find_node(owner)
    covered = dns.rdatatype.from_text(rdtype)
    sigs = node.find_rdataset(dns.rdataclass.IN, dns.rdatatype.RRSIG, covered)
    broken = dns.rdataset.Rdataset(dns.rdataclass.IN, dns.rdatatype.RRSIG, covered, sigs.ttl)
    for sig in sigs:
        assert isinstance(sig, dns.rdtypes.ANY.RRSIG.RRSIG)
        flipped = bytes([sig.signature[0] ^ 0xFF]) + sig.signature[1:]
        broken.add(sig.replace(signature=flipped))
    node.replace_rdataset(broken)


class _Zones:
    def __init__(self, zones: Iterable[SignedZone]) -> None:
        zones = list(zones)
        self.zones = [z.zone if z.zone is not None else z.build() for z in zones]
        self.servfail = {
            (dns.name.from_text(n, dns.name.from_text(z.origin)), dns.rdatatype.from_text(t))
            for z in zones
            for n, t in z.servfail
        }
        self.queries: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def find(self, qname: dns.name.Name) -> dns.zone.Zone | None:
        best = None
        for z in self.zones:
            assert z.origin is not None
            if qname.is_subdomain(z.origin) and (
                best is None or len(z.origin) > len(best.origin or dns.name.root)
            ):
                best = z
        return best

    def answer(self, wire: bytes) -> bytes:
        query = dns.message.from_wire(wire)
        resp = dns.message.make_response(query)
        resp.flags &= ~dns.flags.RA
        do = bool(query.ednsflags & dns.flags.DO)
        if query.edns >= 0:
            resp.use_edns(0, dns.flags.DO if do else 0, 1232)
        if not query.question:
            resp.set_rcode(dns.rcode.FORMERR)
            return resp.to_wire()
        q = query.question[0]
        with self.lock:
            self.queries.append(
                (q.name.to_text(omit_final_dot=True), dns.rdatatype.to_text(q.rdtype))
            )
        zone = self.find(q.name)
        if zone is None:
            resp.set_rcode(dns.rcode.REFUSED)
            return resp.to_wire()
        if (q.name, q.rdtype) in self.servfail:
            resp.set_rcode(dns.rcode.SERVFAIL)
            return resp.to_wire()
        resp.flags |= dns.flags.AA
        _fill(resp, zone, q.name, q.rdtype, do)
        return resp.to_wire(max_size=65535)


def _rrset(
    node: dns.node.Node,
    owner: dns.name.Name,
    rdtype: dns.rdatatype.RdataType,
    covers: dns.rdatatype.RdataType = dns.rdatatype.NONE,
) -> dns.rrset.RRset | None:
    rds = node.get_rdataset(dns.rdataclass.IN, rdtype, covers)
    if rds is None:
        return None
    return dns.rrset.from_rdata_list(owner, rds.ttl, list(rds))


def _with_sigs(
    out: list[dns.rrset.RRset],
    node: dns.node.Node,
    owner: dns.name.Name,
    rdtype: dns.rdatatype.RdataType,
    do: bool,
) -> None:
    rr = _rrset(node, owner, rdtype)
    if rr is None:
        return
    out.append(rr)
    if do:
        sig = _rrset(node, owner, dns.rdatatype.RRSIG, rdtype)
        if sig is not None:
            out.append(sig)


def _covering_nsec(zone: dns.zone.Zone, name: dns.name.Name) -> dns.name.Name | None:
    """The owner of the NSEC record whose span covers name (canonical order)."""
    owners = sorted(
        n
        for n, node in zone.nodes.items()
        if node.get_rdataset(dns.rdataclass.IN, dns.rdatatype.NSEC)
    )
    best = None
    for o in owners:
        if o <= name:
            best = o
    return best if best is not None else (owners[-1] if owners else None)


def _fill(
    resp: dns.message.Message,
    zone: dns.zone.Zone,
    qname: dns.name.Name,
    qtype: dns.rdatatype.RdataType,
    do: bool,
) -> None:
    name = qname
    for _hop in range(8):
        node = zone.get_node(name)
        if node is None:
            break
        if node.get_rdataset(dns.rdataclass.IN, qtype) is not None:
            _with_sigs(resp.answer, node, name, qtype, do)
            return
        cname = node.get_rdataset(dns.rdataclass.IN, dns.rdatatype.CNAME)
        if cname is not None and qtype != dns.rdatatype.CNAME:
            _with_sigs(resp.answer, node, name, dns.rdatatype.CNAME, do)
            target = next(iter(cname)).target
            assert zone.origin is not None
            if not target.is_subdomain(zone.origin):
                return  # the resolver follows it elsewhere
            name = target
            continue
        # NODATA (RFC 4035 section 3.1.3.1): SOA + the name's own NSEC
        _negative(resp, zone, do, [name])
        return
    else:
        resp.set_rcode(dns.rcode.SERVFAIL)
        return
    # NXDOMAIN (RFC 4035 section 3.1.3.2): the NSEC covering the name and the one
    # covering the wildcard at the closest encloser
    resp.set_rcode(dns.rcode.NXDOMAIN)
    assert zone.origin is not None
    encloser = name.parent()
    while encloser != zone.origin and zone.get_node(encloser) is None:
        encloser = encloser.parent()
    proofs = [
        _covering_nsec(zone, name),
        _covering_nsec(zone, dns.name.Name([b"*", *encloser.labels])),
    ]
    _negative(resp, zone, do, [p for p in proofs if p is not None])


def _negative(
    resp: dns.message.Message, zone: dns.zone.Zone, do: bool, nsec_owners: list[dns.name.Name]
) -> None:
    assert zone.origin is not None
    apex = zone.get_node(zone.origin)
    assert apex is not None
    _with_sigs(resp.authority, apex, zone.origin, dns.rdatatype.SOA, do)
    if not do:
        return
    seen: set[dns.name.Name] = set()
    for owner in nsec_owners:
        node = zone.get_node(owner)
        if owner in seen or node is None:
            continue
        seen.add(owner)
        _with_sigs(resp.authority, node, owner, dns.rdatatype.NSEC, do)


class SignedAuthServer:
    """The authoritative server of the lab zones on host (UDP and TCP, one port)."""

    def __init__(self, zones: Iterable[SignedZone], host: str = "127.0.0.1") -> None:
        self.data = _Zones(zones)
        data = self.data

        class Udp(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                wire, sock = self.request
                try:
                    sock.sendto(data.answer(wire), self.client_address)
                except Exception:  # noqa: BLE001 - a malformed query gets no answer
                    pass

        class Tcp(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                conn: socket.socket = self.request
                try:
                    while True:
                        head = conn.recv(2, socket.MSG_WAITALL)
                        if len(head) < 2:
                            return
                        (n,) = struct.unpack("!H", head)
                        reply = data.answer(conn.recv(n, socket.MSG_WAITALL))
                        conn.sendall(struct.pack("!H", len(reply)) + reply)
                except Exception:  # noqa: BLE001
                    return

        for attempt in range(20):
            udp = socketserver.ThreadingUDPServer((host, 0), Udp)
            port = udp.server_address[1]
            try:
                tcp = socketserver.ThreadingTCPServer((host, port), Tcp)
            except OSError:
                udp.server_close()
                if attempt == 19:
                    raise
                continue
            break
        udp.daemon_threads = tcp.daemon_threads = True
        self._servers = [udp, tcp]
        self.host, self.port = host, int(port)

    @property
    def queries(self) -> list[tuple[str, str]]:
        return self.data.queries

    def start(self) -> SignedAuthServer:
        for srv in self._servers:
            threading.Thread(
                target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
            ).start()
        return self

    def stop(self) -> None:
        for srv in self._servers:
            srv.shutdown()
            srv.server_close()

    def __enter__(self) -> SignedAuthServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
