"""pytest setup for the Pallas kernel tests (interpret mode on CPU; keep shapes small)."""


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: slower than a few seconds in interpret mode")
