"""Fixtures shared by every test: real brokers from broker_config, a real hub."""

pytest_plugins = ["tests.broker_fixtures", "tests.hub_fixtures"]
