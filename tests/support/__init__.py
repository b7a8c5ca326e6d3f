"""Helpers the tests share: stacks, processes, databases, API keys (fixtures themselves live in tests/conftest.py)."""
