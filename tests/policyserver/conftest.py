"""The MTA-STS lab fixtures (lab DNS, HTTPS policy host, store) for the policy server."""

from tests.mtasts.conftest import ca, lab, store  # noqa: F401 - fixtures
