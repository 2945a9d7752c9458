"""Prompt moderation before any model work.

:class:`Moderator` is the interface; :class:`PatternModerator` implements it
with a YAML list of categories of regular expressions, each marked severe or
not. A classifier model can replace it by implementing ``check``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Protocol

import yaml
from pydantic import BaseModel, ConfigDict, Field

from serve_app.errors import OpenAIError


class Moderator(Protocol):
    def check(self, prompt: str, level: str) -> str | None:
        """The blocking category's name, or None if the prompt may proceed.
        ``level`` is the request's ``moderation``: auto (all) or low (severe only)."""


class _Category(BaseModel):
    model_config = ConfigDict(extra="forbid")
    severe: bool = Field(default=False, description="Also applied at moderation=low.")
    patterns: list[str] = Field(description="Case-insensitive regular expressions.")


class _ModerationFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    categories: dict[str, _Category]


class PatternModerator:
    def __init__(self, categories: dict[str, _Category]):
        self._rules = [
            (name, cat.severe, [re.compile(p, re.IGNORECASE | re.DOTALL) for p in cat.patterns])
            for name, cat in categories.items()
        ]

    @classmethod
    def from_file(cls, path: str | Path) -> "PatternModerator":
        data = _ModerationFile.model_validate(yaml.safe_load(Path(path).read_text()) or {})
        return cls(data.categories)

    def check(self, prompt: str, level: str) -> str | None:
        for name, severe, patterns in self._rules:
            if level == "low" and not severe:
                continue
            if any(p.search(prompt) for p in patterns):
                return name
        return None


class AllowAll:
    def check(self, prompt: str, level: str) -> str | None:
        return None


def moderation_blocked(category: str) -> OpenAIError:
    return OpenAIError(
        400,
        "Your request was rejected by the safety system: the prompt may contain content that is not allowed "
        f"(category: {category}).",
        type="image_generation_user_error",
        code="moderation_blocked",
        param="prompt",
    )
