"""What an evaluation stores per example: text cut to settings.max_sample_chars, prompt and reference once."""

from __future__ import annotations

MARKER = "\n...[{} characters not stored]...\n"


def clip(text: str, limit: int) -> str:
    """text, or its start and its end around a marker saying how much was cut, in at most `limit` characters."""
    if len(text) <= limit:
        return text
    room = max(limit - len(MARKER.format(len(text))), 2)
    head = room // 2
    return text[:head] + MARKER.format(len(text) - room) + text[len(text) - (room - head) :]
