"""jobs.handbacks (a stopping worker's hand-back is no lost attempt) and workers.device (what a worker
runs jobs on: the estimate's device kind)

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04
"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.add_column(sa.Column('handbacks', sa.Integer(), nullable=False, server_default='0'))
    with op.batch_alter_table('workers') as batch:
        batch.add_column(sa.Column('device', sa.String(length=200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('workers') as batch:
        batch.drop_column('device')
    with op.batch_alter_table('jobs') as batch:
        batch.drop_column('handbacks')
