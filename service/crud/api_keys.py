"""API keys, stored hashed: the clear key is shown once, at creation."""

import hashlib
import secrets

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.crud import PLAIN
from service.models import ApiKey, utcnow

KEY_PREFIX = "consa_"


def hash_key(key: str) -> str:
    # Keys are 256 random bits, so a plain sha256 is enough: there is nothing to brute-force,
    # and a fast hash keeps the per-request lookup cheap (bcrypt is for low-entropy passwords).
    return hashlib.sha256(key.encode()).hexdigest()


def create_api_key(session: Session, *, name: str) -> str:
    """Store a new key (hashed) and return it in clear: the only time it is ever visible."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(name=name, prefix=key[: len(KEY_PREFIX) + 6], key_hash=hash_key(key)))
    session.commit()
    return key


def get_api_key(session: Session, *, key: str) -> ApiKey | None:
    """The key's row, or None when it is unknown or revoked."""
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))
    return row if row is not None and row.revoked_at is None else None


def list_api_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.id)))


def revoke_api_keys(session: Session, *, name: str) -> int:
    """Revoke every active key named `name`; return how many."""
    result = session.execute(update(ApiKey).where(ApiKey.name == name, ApiKey.revoked_at.is_(None))
                             .values(revoked_at=utcnow()), execution_options=PLAIN)
    session.commit()
    return result.rowcount


def key_is_active(session: Session, *, api_key_id: int) -> bool:
    """The key exists and is not revoked (an open event stream asks on every poll)."""
    return bool(session.scalar(select(ApiKey.revoked_at.is_(None)).where(ApiKey.id == api_key_id)))
