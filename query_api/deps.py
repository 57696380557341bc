"""FastAPI dependencies, as ``Annotated`` aliases routes declare."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from query_api.keys import Principal
from query_api.services import Services
from tally.errors import Forbidden, Unauthorized

_bearer = HTTPBearer(auto_error=False, description="an API key from `tally keys create`")


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def get_principal(
    services: ServicesDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    principal = services.keys.verify(credentials.credentials)
    if principal is None:
        raise Unauthorized("unknown or revoked API key")
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def get_merchant(principal: PrincipalDep) -> str:
    """The tenant every /v1 route is scoped to."""
    if principal.merchant_id is None:
        raise Forbidden("/v1 routes need a merchant key; admin keys serve operator routes")
    return principal.merchant_id


MerchantDep = Annotated[str, Depends(get_merchant)]


def get_admin(principal: PrincipalDep) -> Principal:
    if not principal.is_admin:
        raise Forbidden("this route needs an admin key")
    return principal


AdminDep = Annotated[Principal, Depends(get_admin)]
