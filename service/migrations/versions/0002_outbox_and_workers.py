"""the outbox (jobs.enqueued_at) and worker heartbeats

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.add_column(sa.Column('enqueued_at', sa.DateTime(timezone=True), nullable=True))
    # Jobs queued before this revision were published by the old code: do not publish them twice at once.
    op.execute("UPDATE jobs SET enqueued_at = created_at WHERE status = 'queued'")
    op.create_table('workers',
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('idle_since', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('name')
    )


def downgrade() -> None:
    op.drop_table('workers')
    with op.batch_alter_table('jobs') as batch:
        batch.drop_column('enqueued_at')
