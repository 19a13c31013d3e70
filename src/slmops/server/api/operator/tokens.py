"""Operator API tokens (admin only): create (the secret is returned once), list, revoke."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, status
from pydantic import Field
from sqlalchemy import select

from slmops.core.config import StrictModel
from slmops.server.api.deps import AdminDep, SessionDep
from slmops.server.db import create_api_token
from slmops.server.db.models import ApiToken, as_utc
from slmops.server.errors import api_error
from slmops.server.openapi import errors
from slmops.server.security import Role

router = APIRouter(prefix="/tokens", tags=["tokens"])


class TokenCreate(StrictModel):
    name: str = Field(min_length=1, max_length=128)
    role: Role


class TokenPublic(StrictModel):
    id: str
    name: str
    role: Role
    created_at: datetime
    revoked: bool

    @classmethod
    def of(cls, row: ApiToken) -> TokenPublic:
        return cls(
            id=row.id,
            name=row.name,
            role=Role(row.role),
            created_at=as_utc(row.created_at),
            revoked=row.revoked,
        )


class TokenCreated(TokenPublic):
    token: str = Field(description="the secret; shown this once, store it now")


class TokensPublic(StrictModel):
    data: list[TokenPublic]
    count: int


@router.post("", status_code=status.HTTP_201_CREATED)
def create_token(body: TokenCreate, session: SessionDep, _caller: AdminDep) -> TokenCreated:
    issued = create_api_token(session, name=body.name, role=body.role)
    return TokenCreated(**TokenPublic.of(issued.row).model_dump(), token=issued.secret)


@router.get("")
def read_tokens(session: SessionDep, _caller: AdminDep) -> TokensPublic:
    rows = session.scalars(select(ApiToken).order_by(ApiToken.created_at)).all()
    return TokensPublic(data=[TokenPublic.of(r) for r in rows], count=len(rows))


@router.delete("/{token_id}", responses=errors(404))
def revoke_token(token_id: str, session: SessionDep, _caller: AdminDep) -> TokenPublic:
    row = session.get(ApiToken, token_id)
    if row is None:
        raise api_error(404, "not_found", f"no API token {token_id!r}", where="token_id")
    row.revoked = True
    session.commit()
    return TokenPublic.of(row)
