"""Parameter types shared by the service calls (parsed at the boundary, trusted inside)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, StringConstraints

__all__ = ["Id", "Params", "Region"]

# Ids are opaque strings of the original's tables (varchar(64..256)); empty or padded ids are
# always a caller's bug.
Id = Annotated[
    str, StringConstraints(strip_whitespace=False, min_length=1, max_length=128, pattern=r"^\S+$")
]
Region = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
]


class Params(BaseModel):
    """Base of every call's parameters: strict types, unknown fields refused."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)
