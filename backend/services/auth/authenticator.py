"""One request's principal, from the credentials it carries, or why it is refused."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Mapping

from mv.principals import EVERYONE, Principal
from services.asset_persistence import SignatureCheck, UrlSigner
from services.auth.tokens import IdentityProviderUnavailableError, InvalidTokenError, JwtVerifier


class AuthenticationError(Exception):
    """A refused request: its status, error name, message and WWW-Authenticate challenge."""

    def __init__(self, status: int, error: str, message: str, challenge: str | None) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.challenge = challenge


class Authenticator:
    """Tells who a request is: an `X-API-Key` (an owner's, or an operator's), an
    `Authorization: Bearer` JWT (its `sub` owns), or, for a GET or HEAD, a signed URL.

    Keys are compared in constant time, all of them, so the reply time does not tell which
    key came close. A request whose key or token is not accepted may still read through a
    signed URL; otherwise it is refused saying why (401; 403 for a bad signature).
    """

    def __init__(
        self,
        api_keys: Mapping[str, str],
        admin_keys: Mapping[str, str],
        verifier: JwtVerifier | None = None,
        signer: UrlSigner | None = None,
    ) -> None:
        self._keys = [
            (key.encode(), Principal(owner, operator=False, credential="api_key"))
            for key, owner in api_keys.items()
        ] + [
            (key.encode(), Principal(owner, operator=True, credential="admin_key"))
            for key, owner in admin_keys.items()
        ]
        self._verifier = verifier
        self._signer = signer
        schemes = ["ApiKey"] if self._keys else []
        if verifier is not None:
            schemes.append("Bearer")
        self._challenge = ", ".join(schemes)

    @property
    def enabled(self) -> bool:
        """Whether requests need credentials at all."""
        return bool(self._keys) or self._verifier is not None

    async def principal(
        self, method: str, path: str, query: str, api_key: str | None, authorization: str | None
    ) -> Principal:
        """The request's principal; AuthenticationError when it is not let in."""
        if not self.enabled:
            return EVERYONE
        if api_key is not None and (found := self._key_principal(api_key)) is not None:
            return found
        refused = AuthenticationError(401, "Unauthorized", self._missing(), self._challenge)
        if authorization is not None:
            try:
                return await self._bearer_principal(authorization)
            except AuthenticationError as error:
                refused = error
        # Without a valid key or token, a signed URL lets a GET or HEAD of its one path in.
        check = SignatureCheck.ABSENT if self._signer is None else self._signer.check(path, query)
        if check is SignatureCheck.VALID and method in ("GET", "HEAD"):
            return Principal(owner=None, operator=True, credential="signed_url")
        if check is SignatureCheck.EXPIRED:
            raise AuthenticationError(
                403, "SignatureExpired", "the URL's signature has expired", None
            )
        if check is not SignatureCheck.ABSENT:
            raise AuthenticationError(
                403, "InvalidSignature", "the URL's signature does not match it", None
            )
        raise refused

    def _missing(self) -> str:
        if self._verifier is None:
            return "a valid X-API-Key header is required"
        if not self._keys:
            return "an Authorization: Bearer token is required"
        return "a valid X-API-Key header or Authorization: Bearer token is required"

    def _key_principal(self, offered: str) -> Principal | None:
        candidate = offered.encode()
        found = None
        for key, principal in self._keys:
            if hmac.compare_digest(candidate, key):
                found = principal
        return found

    async def _bearer_principal(self, authorization: str) -> Principal:
        scheme, _, token = authorization.partition(" ")
        if self._verifier is None or scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationError(401, "Unauthorized", self._missing(), self._challenge)
        try:
            owner = await asyncio.to_thread(self._verifier.owner, token.strip())
        except InvalidTokenError as error:
            challenge = f'Bearer error="invalid_token", error_description="{error}"'
            raise AuthenticationError(401, "InvalidToken", str(error), challenge) from None
        except IdentityProviderUnavailableError as error:
            raise AuthenticationError(
                503, "IdentityProviderUnavailable", str(error), None
            ) from None
        return Principal(owner, operator=False, credential="bearer")
