"""The downgrade lab: a DNS server, CA, policy hosts, MTAs and attackers on loopback."""
