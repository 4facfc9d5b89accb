"""Who makes a request: principals from API keys, operator keys, bearer JWTs or signed URLs.

`mv.principals` defines who; `tokens` verifies bearer JWTs against an identity provider's keys;
`authenticator` tells, for one request, which principal it is or why it is refused.
"""

from mv.principals import EVERYONE, Principal
from services.auth.authenticator import AuthenticationError, Authenticator
from services.auth.tokens import (
    ASYMMETRIC_ALGORITHMS,
    IdentityProviderUnavailableError,
    InvalidTokenError,
    JwtVerifier,
)

__all__ = [
    "ASYMMETRIC_ALGORITHMS",
    "EVERYONE",
    "AuthenticationError",
    "Authenticator",
    "IdentityProviderUnavailableError",
    "InvalidTokenError",
    "JwtVerifier",
    "Principal",
]
