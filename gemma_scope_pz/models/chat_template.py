"""Gemma 3's instruction-tuned chat template, rendered as prompt text.

:func:`format_chat` writes the turns exactly as Gemma 3's official template does; the text is
then tokenized by :meth:`gemma_scope_pz.models.tokenizer.Gemma3Tokenizer.encode`, which adds BOS
and parses the ``<start_of_turn>``/``<end_of_turn>`` markers to their ids (105/106).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["format_chat"]


def _message_text(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        parts = []
        for item in content:
            if not (isinstance(item, dict) and item.get("type") == "text"):
                raise ValueError(f"message {index}: only text content is supported, got {item!r}")
            parts.append(item["text"])
        return "".join(parts)
    raise TypeError(f"message {index}: content must be a str or list, got {type(content)}")


def format_chat(
    messages: str | Sequence[dict[str, Any]], add_generation_prompt: bool = True
) -> str:
    """Renders messages with Gemma 3's instruction-tuned chat template (without BOS).

    Follows the official template: roles must alternate user/model ("assistant" is an alias
    of "model"); an optional leading system message is prepended, followed by a blank line, to
    the first user turn; message contents are stripped of surrounding whitespace. Example::

        format_chat("Hi") == "<start_of_turn>user\\nHi<end_of_turn>\\n<start_of_turn>model\\n"

    Args:
      messages: a single user message, or a list of ``{"role": ..., "content": ...}`` dicts
        (content a str or a list of ``{"type": "text", "text": ...}`` items).
      add_generation_prompt: end with ``<start_of_turn>model\\n`` to prompt a reply.

    Returns:
      The prompt text; pass it to :meth:`Gemma3Tokenizer.encode`, which adds BOS.
    """
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    messages = list(messages)
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"message {index} must be a dict with 'role' and 'content'")
    prefix = ""
    if messages and messages[0]["role"] == "system":
        prefix = _message_text(messages[0]["content"], 0) + "\n\n"
        messages = messages[1:]
    if not messages:
        raise ValueError("format_chat needs at least one user message")
    turns = []
    for index, message in enumerate(messages):
        role = {"assistant": "model"}.get(message["role"], message["role"])
        expected = "user" if index % 2 == 0 else "model"
        if role != expected:
            raise ValueError(
                f"message {index} has role {message['role']!r}; roles must alternate "
                "user/model starting with user (after an optional first system message)"
            )
        text = (prefix if index == 0 else "") + _message_text(message["content"], index).strip()
        turns.append(f"<start_of_turn>{role}\n{text}<end_of_turn>\n")
    if add_generation_prompt:
        turns.append("<start_of_turn>model\n")
    return "".join(turns)
