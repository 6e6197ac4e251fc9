"""Lab CA and certificates for the container lab (written to the ``certs`` volume)."""

import sys
from pathlib import Path

import trustme

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
ca = trustme.CA(organization_name="relay container lab CA")
ca.cert_pem.write_to_path(str(out / "ca.pem"))
for stem, names in (
    ("mx.lab", ["mx.victim.lab", "mx.open.lab"]),
    ("mta-sts.victim.lab", ["mta-sts.victim.lab"]),
):
    leaf = ca.issue_cert(*names)
    (out / f"{stem}.crt").write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    (out / f"{stem}.key").write_bytes(leaf.private_key_pem.bytes())
for f in out.iterdir():
    f.chmod(0o644)  # lab keys: readable by the unprivileged services
print(f"wrote lab CA and certificates to {out}")
