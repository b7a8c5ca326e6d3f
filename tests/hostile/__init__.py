"""Hostile input against every route of the API (embedded stack): nothing a client sends may be a 5xx."""
