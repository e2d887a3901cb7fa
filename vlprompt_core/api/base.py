"""What every part of the contract shares: the base of plug-in options models and
the error a plug-in raises when it breaks the contract."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Options(BaseModel):
    """Base of every plug-in's options model: unknown keys are errors, not ignored,
    and so are infinite or NaN floats."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ContractError(RuntimeError):
    """A plug-in broke the contract it signed (e.g. a text block hook changed the
    sequence length). A bug in the plug-in, not a mistake of the user."""
