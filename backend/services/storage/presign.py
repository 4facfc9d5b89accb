"""Presigned GET URLs from botocore's SigV4 query signer, with the endpoint resolved once.

`generate_presigned_url` re-resolves the endpoint ruleset and re-serialises the request on
every call, which costs more than the signature itself. The URL prefix of a bucket never
changes for a client, so it is taken once from boto3's own presigned URL and every later URL
is signed with the same signer boto3 uses (`S3SigV4QueryAuth`) and the client's credentials.
"""

from __future__ import annotations

import datetime as dt
from typing import Any
from urllib.parse import quote, urlsplit

from botocore.auth import S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials, RefreshableCredentials
from botocore.exceptions import NoCredentialsError

from services.storage.base import PresignedUrl

_PROBE_KEY = "presign-probe"


def _parse_timestamp(value: str) -> dt.datetime:
    """Parse SigV4's '20261121T120000Z' (strptime is slower than the signature itself)."""
    return dt.datetime(
        int(value[0:4]),
        int(value[4:6]),
        int(value[6:8]),
        int(value[9:11]),
        int(value[11:13]),
        int(value[13:15]),
        tzinfo=dt.UTC,
    )


class S3Presigner:
    """Signs GET URLs for one bucket of one boto3 S3 client."""

    def __init__(self, client: Any, bucket: str) -> None:
        self._client = client
        self._bucket = bucket
        self._region = client.meta.region_name
        self._prefix: str | None = None

    def _url_prefix(self) -> str:
        if self._prefix is None:
            probe = self._client.generate_presigned_url(
                "get_object", Params={"Bucket": self._bucket, "Key": _PROBE_KEY}, ExpiresIn=1
            )
            parts = urlsplit(probe)
            if not parts.path.endswith("/" + _PROBE_KEY):
                raise RuntimeError(f"unexpected presigned URL layout: {parts.path}")
            self._prefix = f"{parts.scheme}://{parts.netloc}{parts.path[: -len(_PROBE_KEY)]}"
        return self._prefix

    def signs_without_io(self) -> bool:
        """Whether signing now is pure computation: the prefix is known and the credentials
        are static or not yet due for a refresh (a refresh may call STS or instance metadata).
        """
        credentials = self._client._request_signer._credentials
        if credentials is None:
            return False
        if isinstance(credentials, RefreshableCredentials):
            ready = not credentials.refresh_needed()
        else:
            ready = isinstance(credentials, Credentials)
        if ready and self._prefix is None:
            self._url_prefix()  # endpoint resolution is computation once credentials are ready
        return ready

    def _credentials(self) -> Any:
        # The signer holds the client's credential provider; refreshable credentials
        # refresh themselves in get_frozen_credentials(), as they do for boto3's own calls.
        credentials = self._client._request_signer._credentials
        if credentials is None:
            raise NoCredentialsError()
        return credentials.get_frozen_credentials()

    def presign(self, key: str, expires_in: int) -> PresignedUrl:
        """A GET URL for `key`, identical to boto3's `generate_presigned_url('get_object')`."""
        request = AWSRequest(method="GET", url=self._url_prefix() + quote(key, safe="/~"))
        S3SigV4QueryAuth(self._credentials(), "s3", self._region, expires=expires_in).add_auth(
            request
        )
        expires_at = _parse_timestamp(request.context["timestamp"]) + dt.timedelta(
            seconds=expires_in
        )
        return PresignedUrl(request.prepare().url, expires_in, expires_at)
