"""Signed API URLs: an expiry and an HMAC over the path, so an <img src> needs no API key."""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import time
from collections.abc import Callable
from enum import Enum
from urllib.parse import parse_qsl, unquote, urlencode

from config import Settings

EXPIRES_PARAM = "expires"
SIGNATURE_PARAM = "signature"
# Expiry times are rounded down to a tenth of the validity, so one image keeps one URL for a
# while (browsers and CDNs cache by URL) and every URL handed out keeps >= 90 % of it.
_EXPIRY_STEPS = 10


class SignatureCheck(Enum):
    """What a request's signature says."""

    VALID = "valid"
    ABSENT = "absent"
    INVALID = "invalid"
    EXPIRED = "expired"


class UrlSigner:
    """Signs GET URLs of this API for `expires_in` seconds, and checks them."""

    def __init__(
        self, secret: str, expires_in: int, clock: Callable[[], float] = time.time
    ) -> None:
        self._secret = secret.encode()
        self.expires_in = expires_in
        self._step = max(1, expires_in // _EXPIRY_STEPS)
        self._clock = clock

    def _signature(self, path: str, params: list[tuple[str, str]]) -> str:
        canonical = path + "?" + urlencode(sorted(params))
        digest = hmac.new(self._secret, canonical.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def sign(self, path: str, params: dict[str, str] | None = None) -> str:
        """`path` (an absolute API path, URL-quoted) with its query, an expiry and a signature.

        The signature covers the path as the server decodes it, and every query parameter.
        """
        expires = math.floor((self._clock() + self.expires_in) / self._step) * self._step
        signed = [*(params or {}).items(), (EXPIRES_PARAM, str(expires))]
        signed.append((SIGNATURE_PARAM, self._signature(unquote(path), signed)))
        return f"{path}?{urlencode(signed)}"

    def check(self, path: str, query_string: str) -> SignatureCheck:
        """Whether the query signs `path` (decoded, as in the ASGI scope) and every other
        parameter, and is still valid."""
        params = parse_qsl(query_string, keep_blank_values=True)
        signatures = [value for name, value in params if name == SIGNATURE_PARAM]
        if not signatures:
            return SignatureCheck.ABSENT
        signed = [(name, value) for name, value in params if name != SIGNATURE_PARAM]
        expiries = [value for name, value in signed if name == EXPIRES_PARAM]
        if len(signatures) != 1 or len(expiries) != 1 or not expiries[0].isdigit():
            return SignatureCheck.INVALID
        expected = self._signature(path, signed)
        if not hmac.compare_digest(expected.encode(), signatures[0].encode()):
            return SignatureCheck.INVALID
        if int(expiries[0]) < self._clock():
            return SignatureCheck.EXPIRED
        return SignatureCheck.VALID


def url_signer(settings: Settings) -> UrlSigner | None:
    """The signer URL_SIGNING_SECRET configures (valid for PRESIGNED_URL_EXPIRY), or None."""
    secret = settings.url_signing_secret
    if secret is None:
        return None
    return UrlSigner(secret.get_secret_value(), settings.presigned_url_expiry)
