"""billing: the ledger, its rollups, the price book's cached and per-call prices

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 19:00:00
"""

from __future__ import annotations

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass  # PLACEHOLDER (issue 6 in progress)


def downgrade() -> None:
    pass
