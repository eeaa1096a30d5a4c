"""Create or upgrade the database schema to the newest Alembic revision."""

from pathlib import Path

from alembic import command
from alembic.config import Config

from service.db import engine_for

HERE = Path(__file__).parent


def alembic_config(url: str) -> Config:
    cfg = Config(str(HERE / "alembic.ini"))
    cfg.set_main_option("script_location", str(HERE / "migrations"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str) -> None:
    """Idempotent: a fresh database gets every table, an old one the missing revisions."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    cfg = alembic_config(url)
    with engine_for(url).begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "head")
