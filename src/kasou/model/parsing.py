"""Raw input into a model, the one way every model's ``parse`` does it."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from kasou.errors import InvalidSpec


def parse_model(cls: type[Any], data: Any) -> Any:
    """Validate raw input into a model, raising InvalidSpec with one line."""
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "request"
        raise InvalidSpec(f"{field}: {err['msg']}", field=field) from None
