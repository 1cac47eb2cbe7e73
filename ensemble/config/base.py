"""Building blocks every config section shares: the strict base model and name types."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
Name = Annotated[str, Field(pattern=NAME_PATTERN.pattern)]
Sha256Hex = Annotated[str, StringConstraints(to_lower=True, pattern=r"^[0-9a-fA-F]{64}$")]
"""A hex SHA-256 digest (either case; kept lower-case)."""


class StrictModel(BaseModel):
    """Base of every config section: unknown keys are errors, values are not coerced loosely."""

    model_config = ConfigDict(extra="forbid", frozen=True)
