"""The one place that knows each OpenAI model family's rules.

A model id in the registry declares a family; the family decides defaults
that OpenAI documents per model (and, as the contract grows, which sizes,
qualities and parameters it takes). The request resolver reads these rules;
nothing else hard-codes a family name.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FamilyRules:
    name: str
    default_response_format: str
    default_output_format: str = "png"


FAMILIES: dict[str, FamilyRules] = {
    "dall-e-2": FamilyRules(name="dall-e-2", default_response_format="url"),
    "dall-e-3": FamilyRules(name="dall-e-3", default_response_format="url"),
    "gpt-image": FamilyRules(name="gpt-image", default_response_format="b64_json"),
}
