"""Bearer JWTs from an identity provider: verified against its published keys (JWKS)."""

from __future__ import annotations

import jwt

# Only public-key signatures: a token signed with a shared secret (HS*) or unsigned (`none`)
# could be forged by anyone who knows, or guesses, what the server would accept.
ASYMMETRIC_ALGORITHMS = [
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
]
MAX_SUBJECT_CHARS = 256


class InvalidTokenError(Exception):
    """A bearer token that is not accepted; the message says why, never quoting the token."""


class IdentityProviderUnavailableError(Exception):
    """The identity provider's key set could not be fetched: the token cannot be checked."""


class JwtVerifier:
    """Checks tokens of one issuer and audience.

    Keys come from `jwks_url` through PyJWT's JWKS client: cached, and fetched again when a
    token names an unknown key id (at most once per `refresh_cooldown_seconds`, so unknown
    ids cannot make the server hammer the provider). `owner` blocks while it fetches; call
    it off the event loop.
    """

    def __init__(
        self,
        jwks_url: str,
        issuer: str,
        audience: str,
        *,
        refresh_cooldown_seconds: float = 30.0,
        timeout_seconds: float = 5.0,
    ) -> None:
        self.issuer = issuer
        self.audience = audience
        self._keys = jwt.PyJWKClient(
            jwks_url,
            cache_keys=True,
            timeout=timeout_seconds,
            cooldown_duration=refresh_cooldown_seconds,
        )

    def owner(self, token: str) -> str:
        """The token's subject, once its signature, issuer, audience and times check out."""
        try:
            algorithm = jwt.get_unverified_header(token).get("alg")
            if algorithm not in ASYMMETRIC_ALGORITHMS:
                raise InvalidTokenError("the token is not signed with a public-key algorithm")
            key = self._keys.get_signing_key_from_jwt(token)
            claims = jwt.decode(
                token,
                key,
                algorithms=ASYMMETRIC_ALGORITHMS,
                audience=self.audience,
                issuer=self.issuer,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.PyJWKClientConnectionError as error:
            raise IdentityProviderUnavailableError(
                "the identity provider's keys could not be fetched"
            ) from error
        except jwt.PyJWKClientError:
            raise InvalidTokenError("the token's key is not one of the issuer's") from None
        except jwt.ExpiredSignatureError:
            raise InvalidTokenError("the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise InvalidTokenError("the token is not valid yet") from None
        except jwt.InvalidIssuerError:
            raise InvalidTokenError("the token is from another issuer") from None
        except jwt.InvalidAudienceError:
            raise InvalidTokenError("the token is for another audience") from None
        except jwt.MissingRequiredClaimError as error:
            raise InvalidTokenError(f"the token has no {error.claim!r} claim") from None
        except jwt.InvalidTokenError:
            raise InvalidTokenError("the token is malformed or its signature is wrong") from None
        subject = claims["sub"]
        if not isinstance(subject, str) or not 0 < len(subject) <= MAX_SUBJECT_CHARS:
            raise InvalidTokenError(f"the token's sub must be 1-{MAX_SUBJECT_CHARS} characters")
        return subject
