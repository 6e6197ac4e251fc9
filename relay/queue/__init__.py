"""The durable queue: spool (tables and state transitions) and scheduler (qmgr)."""
