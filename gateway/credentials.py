"""Reading the token a client presents: `Authorization: Bearer <token>` or HTTP Basic carrying the token."""

from __future__ import annotations

import binascii
from base64 import b64decode

from gateway.problems import GatewayError

MAX_AUTHORIZATION_LENGTH = 4096
REALM = 'Bearer realm="gateway"'


def missing_credentials(detail: str) -> GatewayError:
    return GatewayError(401, "missing_credentials", detail, headers={"WWW-Authenticate": REALM})


def invalid_token(detail: str = "The token is not valid.") -> GatewayError:
    # RFC 6750 section 3: error codes in WWW-Authenticate. The detail is the same for every cause.
    return GatewayError(
        401,
        "invalid_token",
        detail,
        headers={"WWW-Authenticate": f'{REALM}, error="invalid_token", error_description="{detail}"'},
    )


def presented_token(authorization: str | None, prefix: str) -> str:
    """The token string from the Authorization header, or a 401 `missing_credentials` explaining why not."""
    if not authorization:
        raise missing_credentials("Send the API token as 'Authorization: Bearer <token>'.")
    if len(authorization) > MAX_AUTHORIZATION_LENGTH:
        raise GatewayError(
            431, "authorization_too_long", f"The Authorization header is longer than {MAX_AUTHORIZATION_LENGTH} characters."
        )
    scheme, _, value = authorization.strip().partition(" ")
    value = value.strip()
    scheme = scheme.lower()
    if scheme == "bearer":
        if not value or " " in value:
            raise missing_credentials("The Bearer credentials are empty or malformed.")
        return value
    if scheme == "basic":
        return _token_from_basic(value, prefix)
    raise missing_credentials("Only the Bearer and Basic authorization schemes are accepted.")


def _token_from_basic(value: str, prefix: str) -> str:
    try:
        decoded = b64decode(value.encode("ascii"), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeError, ValueError):
        raise missing_credentials("The Basic credentials are not valid base64 of 'user:password'.") from None
    user, colon, password = decoded.partition(":")
    if not colon:
        raise missing_credentials("The Basic credentials are not valid base64 of 'user:password'.")
    marker = prefix + "_"
    for candidate in (user, password):
        if candidate.startswith(marker):
            return candidate
    if user or password:
        return user or password
    raise missing_credentials("The Basic credentials carry no token.")
