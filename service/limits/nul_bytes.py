r"""No NUL byte and no lone UTF-16 surrogate in any string of a request: the check (reject_nul) and the
schema that states it. JSON may spell both (`\u0000`, `\ud800`); neither can be stored (PostgreSQL text
refuses NUL, and a lone surrogate has no UTF-8 form: encoding it raised a 500)."""

import re

from service.problems import field_error

_SURROGATE = re.compile("[\ud800-\udfff]")

# What reject_nul enforces, as the API's schema states it for a query string (json_schema_extra: the
# check itself stays reject_nul's, so the error keeps its code).
NO_NUL_SCHEMA = {"pattern": "^[^\\x00]*$"}


def reject_nul(value, loc: list) -> None:
    """A NUL byte is in no valid path, id or label, and PostgreSQL cannot store one in text: 422."""
    if isinstance(value, str):
        if "\x00" in value:
            raise field_error(422, loc, "must not contain a NUL byte", "invalid_character")
        if _SURROGATE.search(value):
            raise field_error(422, loc, "must not contain a lone UTF-16 surrogate (\\ud800-\\udfff): it is "
                                        "not a character", "invalid_character")
    elif isinstance(value, dict):
        for k, v in value.items():
            reject_nul(k, loc)
            reject_nul(v, [*loc, k])
    elif isinstance(value, list):
        for i, v in enumerate(value):
            reject_nul(v, [*loc, i])
