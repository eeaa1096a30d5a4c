"""A job's size against the server's bounds (CONSA_MAX_STEPS, _SEQ_LEN, _BATCH_SIZE, _TOKENS_PER_JOB,
_METADATA_BYTES): the defaults refuse a job of days."""

import json

from service.problems import field_error
from service.settings import Settings


def check_limits(settings: Settings, body) -> None:
    """The job's size against the server's bounds: each of steps, seq_len, batch_size, their product
    (training tokens), the duo baseline's training steps (an evaluation option), and the metadata's
    JSON size."""
    for field, bound, variable in (("steps", settings.max_steps, "CONSA_MAX_STEPS"),
                                   ("seq_len", settings.max_seq_len, "CONSA_MAX_SEQ_LEN"),
                                   ("batch_size", settings.max_batch_size, "CONSA_MAX_BATCH_SIZE"),
                                   ("duo_steps", settings.max_steps, "CONSA_MAX_STEPS")):
        value = getattr(body, field)
        if value is not None and value > bound and field not in body.model_fields_set:
            setattr(body, field, bound)  # a default above this server's bound: the bound (as its schema says)
            continue
        if value is not None and value > bound:
            raise field_error(422, ["body", field], f"at most {bound} on this server ({variable})", "limit_exceeded")
    tokens = body.steps * body.seq_len * body.batch_size
    if tokens > settings.max_tokens_per_job:
        raise field_error(422, ["body", "steps"], f"steps x seq_len x batch_size = {tokens} training tokens; "
                                                  f"this server runs at most {settings.max_tokens_per_job} per job "
                                                  "(CONSA_MAX_TOKENS_PER_JOB)", "limit_exceeded")
    size = len(json.dumps(body.metadata, ensure_ascii=False).encode())
    if size > settings.max_metadata_bytes:
        raise field_error(422, ["body", "metadata"], f"{size} bytes as JSON; at most {settings.max_metadata_bytes}",
                          "metadata_too_large")
