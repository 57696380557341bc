"""FastAPI dependencies, as ``Annotated`` aliases routes declare."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import Depends, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from query_api.keys import Principal
from query_api.services import Services
from tally.errors import Forbidden, InvalidArgument, Unauthorized

_bearer = HTTPBearer(auto_error=False, description="an API key from `tally keys create`")


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def get_principal(
    services: ServicesDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The key's principal, its request counted against ``api.rate_limit``: every route
    that takes a key (all of /v1) is limited per key; the health routes take none."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    principal = services.keys.verify(credentials.credentials)
    if principal is None:
        raise Unauthorized("unknown or revoked API key")
    if services.rate_limit is not None:
        services.rate_limit.hit(principal.key_id)
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def get_merchant(principal: PrincipalDep) -> str:
    """The tenant every /v1 route is scoped to."""
    if principal.merchant_id is None:
        raise Forbidden("/v1 routes need a merchant key; admin keys serve operator routes")
    return principal.merchant_id


MerchantDep = Annotated[str, Depends(get_merchant)]


def get_merchant_or_admin(
    principal: PrincipalDep,
    merchant: Annotated[
        str | None,
        Query(description="admin keys only: the merchant to read (a merchant key reads its own)"),
    ] = None,
) -> str:
    """The tenant of a route operators may use too: a merchant key's own merchant, or
    the one an admin key names (admin keys belong to no merchant)."""
    if principal.is_admin:
        if merchant is None or not merchant.strip():
            raise InvalidArgument("an admin key names the merchant to read: add merchant=<id>")
        return merchant
    own = get_merchant(principal)
    if merchant is not None and merchant != own:
        raise Forbidden("a merchant key reads only its own merchant")
    return own


MerchantOrAdminDep = Annotated[str, Depends(get_merchant_or_admin)]


def get_admin(principal: PrincipalDep) -> Principal:
    if not principal.is_admin:
        raise Forbidden("this route needs an admin key")
    return principal


AdminDep = Annotated[Principal, Depends(get_admin)]


def get_force_base(
    principal: PrincipalDep,
    force_base: Annotated[
        bool, Query(description="skip the rollups (for comparisons); admin keys only")
    ] = False,
) -> bool:
    """Scanning the base rows costs far more than a rollup: it is operator tooling
    (comparisons, benchmarks), so only admin keys may ask for it."""
    if force_base and not principal.is_admin:
        raise Forbidden("force_base is admin tooling: it needs an admin key")
    return force_base


ForceBaseDep = Annotated[bool, Depends(get_force_base)]
# A range of calendar buckets, as the aggregate routes take it.
FromQuery = Annotated[datetime, Query(alias="from", description="inclusive, with an offset")]
ToQuery = Annotated[datetime, Query(description="exclusive, with an offset")]
BucketSize = Literal["hour", "day", "month"]
