"""Mailing lists (issue 11): lists defined in config.toml, members in the store.

Modules, one job each: ``addresses`` (which list address a recipient is), ``members``
(the store tables: members, tokens, posts and their fan-out, held posts, archive),
``transform`` (a post made into the copy a member gets: pure functions over bytes),
``bounces`` (RFC 3464 DSNs, RFC 5965 ARF reports and plain bounce texts read),
``policy`` (who may post, DMARC mitigation, bounce scoring: small pure decisions),
``service`` (mail to a list address handled; the durable fan-out), ``notices`` (the
mail the list writes), ``mbox`` (archive export).
"""
