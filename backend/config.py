"""Settings: the one place the backend reads its environment."""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import socket
import sys
from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from mv.character_reference import MAX_IMAGES_PER_REQUEST

BACKEND_DIR = Path(__file__).resolve().parent
REPO_ROOT = BACKEND_DIR.parent
DEFAULT_OUTPUT_DIR = BACKEND_DIR / "mv" / "outputs"
MAX_PRESIGNED_URL_EXPIRY = 604_800  # SigV4 presigned URLs cannot outlive seven days.

_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_REPLICATE_MODEL = re.compile(r"^[\w.-]+/[\w.-]+(:[0-9a-f]{64})?$")
_SECRET_NAME = re.compile(r"TOKEN|SECRET|KEY|PASSWORD")
_ORIGIN = re.compile(r"https?://[^\s/?#]+")
_INSTANCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
MIN_API_KEY_CHARS = 16
# An API key's owner name (`owner:key` in API_KEYS): what records store and logs show.
_OWNER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
MIN_SIGNING_SECRET_CHARS = 32
# WEBHOOK_SECRET in the Standard Webhooks format: `whsec_` and the base64 of the HMAC key.
WEBHOOK_SECRET_PREFIX = "whsec_"
MIN_WEBHOOK_KEY_BYTES = 24
MAX_WEBHOOK_KEY_BYTES = 64
# Generations one API replica runs at once when a worker tier makes the pixels: enough
# concurrent requests for the worker to batch across them.
WORKER_TIER_GENERATION_WORKERS = 16


def parse_api_keys(text: str) -> dict[str, str]:
    """`owner:key,key,...` as key -> owner. A key without a name is its own owner, named by a
    digest of it (records and logs never hold a key). Raises ValueError saying what is wrong."""
    owners: dict[str, str] = {}
    for entry in (part.strip() for part in text.split(",")):
        owner, separator, key = entry.partition(":")
        if not separator:
            owner, key = "", entry
        elif not _OWNER_NAME.fullmatch(owner):
            raise ValueError("an owner name is 1-64 of A-Z, a-z, 0-9, '_', '.', '@', '-'")
        if len(key) < MIN_API_KEY_CHARS:
            raise ValueError(f"each key needs at least {MIN_API_KEY_CHARS} characters")
        if not key.isascii() or not key.isprintable():
            raise ValueError("keys must be printable ASCII")
        if key in owners:
            raise ValueError("a key is listed twice")
        owners[key] = owner or "key-" + hashlib.sha256(key.encode()).hexdigest()[:12]
    return owners


def _default_instance_name() -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:63].lstrip("-_.")
    return name or "instance"


def webhook_signing_key(secret: str) -> bytes:
    """The key a `whsec_<base64>` secret encodes; ValueError saying what is wrong otherwise."""
    if not secret.startswith(WEBHOOK_SECRET_PREFIX):
        raise ValueError(f"must start with {WEBHOOK_SECRET_PREFIX} (the Standard Webhooks format)")
    try:
        key = base64.b64decode(secret.removeprefix(WEBHOOK_SECRET_PREFIX), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"must be {WEBHOOK_SECRET_PREFIX} followed by base64") from None
    if not MIN_WEBHOOK_KEY_BYTES <= len(key) <= MAX_WEBHOOK_KEY_BYTES:
        raise ValueError(f"must encode {MIN_WEBHOOK_KEY_BYTES} to {MAX_WEBHOOK_KEY_BYTES} bytes")
    return key


DEFAULT_LOCAL_MODEL = "black-forest-labs/FLUX.2-klein-4B"
DEFAULT_REPLICATE_REFERENCE_MODEL = "black-forest-labs/flux-2-klein-4b"
# The Replicate model that keeps the look of each local family, so a fallback looks alike.
_REPLICATE_FAMILIES = (
    ("klein", "black-forest-labs/flux-2-klein-4b"),
    ("kontext", "black-forest-labs/flux-kontext-pro"),
    ("schnell", "black-forest-labs/flux-schnell"),
    ("flux.1-dev", "black-forest-labs/flux-dev"),
)


def replicate_model_for(local_model_id: str) -> str:
    """The Replicate model of `local_model_id`'s family (klein when none is recognised)."""
    name = Path(local_model_id).name.lower()
    return next(
        (model for marker, model in _REPLICATE_FAMILIES if marker in name),
        DEFAULT_REPLICATE_REFERENCE_MODEL,
    )


class SettingsError(ValueError):
    """Raised when the environment holds an invalid setting; the message names it."""


class Settings(BaseSettings):
    """Every setting of the backend, validated when the process starts."""

    model_config = SettingsConfigDict(
        env_file=REPO_ROOT / ".env",
        env_file_encoding="utf-8",
        case_sensitive=False,
        extra="ignore",
        frozen=True,
    )

    # Storage
    storage_backend: Literal["local", "s3"] = "local"
    serve_from_cloud: bool = False
    storage_bucket: str | None = None
    aws_region: str = "us-east-1"
    aws_endpoint_url: str | None = None
    presigned_url_expiry: int = Field(default=3600, ge=1, le=MAX_PRESIGNED_URL_EXPIRY)
    output_dir: Path = DEFAULT_OUTPUT_DIR
    public_base_url: str | None = None
    s3_max_attempts: int = Field(default=3, ge=1, le=10)
    s3_connect_timeout: float = Field(default=5.0, gt=0, le=120)
    s3_read_timeout: float = Field(default=30.0, gt=0, le=600)
    storage_max_concurrency: int = Field(default=8, ge=1, le=64)
    pending_upload_retry_seconds: float = Field(default=60.0, ge=1, le=86_400)
    delete_poll_seconds: float = Field(default=1.0, ge=0.05, le=60)
    candidate_retention_days: int | None = Field(default=None, ge=1, le=36_500)

    # Generation
    image_generator: Literal["auto", "worker", "local", "replicate"] = "auto"
    local_model_id: str = Field(default=DEFAULT_LOCAL_MODEL, min_length=1)
    local_device: Literal["auto", "cuda", "cpu"] = "auto"
    replicate_api_token: SecretStr | None = None
    # Unset: the Replicate model of the local model's family (replicate_model_for).
    replicate_model: str | None = None
    replicate_reference_model: str = DEFAULT_REPLICATE_REFERENCE_MODEL
    replicate_max_attempts: int = Field(default=4, ge=1, le=10)
    max_queued_generations: int = Field(default=8, ge=1, le=1000)
    # Unset: 1 (one GPU in this process), or WORKER_TIER_GENERATION_WORKERS with a worker tier.
    generation_workers: int | None = Field(default=None, ge=1, le=64)
    generation_timeout_seconds: float = Field(default=300.0, gt=0, le=3600)
    # Seconds of silence after which an event stream sends a heartbeat comment.
    events_heartbeat_seconds: float = Field(default=15.0, gt=0, le=300)

    # GPU worker tier (Ray Serve): the API's client side, and the worker app's own settings
    worker_url: str | None = None
    worker_token: SecretStr | None = None
    overflow_to_replicate: bool = False
    worker_port: int = Field(default=8001, ge=1, le=65535)
    worker_max_batch_images: int = Field(
        default=MAX_IMAGES_PER_REQUEST, ge=MAX_IMAGES_PER_REQUEST, le=64
    )
    worker_batch_wait_seconds: float = Field(default=0.1, ge=0, le=10)
    worker_max_queued_requests: int = Field(default=16, ge=1, le=10_000)

    # Webhooks
    webhook_secret: SecretStr | None = None
    webhook_max_attempts: int = Field(default=5, ge=1, le=20)
    webhook_timeout_seconds: float = Field(default=10.0, gt=0, le=120)
    webhook_retry_base_seconds: float = Field(default=2.0, gt=0, le=300)
    webhook_allow_private_networks: bool = False
    webhook_allow_http: bool = False

    # Access and operations
    api_keys: SecretStr | None = None
    admin_api_keys: SecretStr | None = None
    auth_jwks_url: str | None = None
    auth_issuer: str | None = None
    auth_audience: str | None = None
    url_signing_secret: SecretStr | None = None
    cors_origins: str = ""
    debug_endpoints: bool = False
    log_format: Literal["json", "text"] = "json"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    instance_name: str = Field(default_factory=_default_instance_name)

    @field_validator(
        "storage_bucket",
        "aws_endpoint_url",
        "public_base_url",
        "worker_url",
        "generation_workers",
        "candidate_retention_days",
        "replicate_model",
        "auth_jwks_url",
        "auth_issuer",
        "auth_audience",
        mode="before",
    )
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("storage_bucket")
    @classmethod
    def _valid_bucket(cls, value: str | None) -> str | None:
        if value is not None and not _BUCKET_NAME.fullmatch(value):
            raise ValueError("must be a valid S3 bucket name (3-63 of a-z, 0-9, '.', '-')")
        return value

    @field_validator("aws_endpoint_url", "public_base_url", "worker_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", value):
            raise ValueError("must be an http:// or https:// URL without query or fragment")
        return value.rstrip("/")

    @field_validator("output_dir")
    @classmethod
    def _absolute_output_dir(cls, value: Path) -> Path:
        # Relative paths are taken from backend/, so the server and scripts agree on the
        # local tier whatever directory they are started from.
        path = value.expanduser()
        return (path if path.is_absolute() else BACKEND_DIR / path).resolve()

    @field_validator("replicate_model", "replicate_reference_model")
    @classmethod
    def _valid_replicate_model(cls, value: str | None) -> str | None:
        if value is not None and not _REPLICATE_MODEL.fullmatch(value):
            raise ValueError("must be 'owner/name' or 'owner/name:<64-hex version>'")
        return value

    @field_validator(
        "replicate_api_token",
        "webhook_secret",
        "api_keys",
        "admin_api_keys",
        "worker_token",
        "url_signing_secret",
    )
    @classmethod
    def _token_or_unset(cls, value: SecretStr | None) -> SecretStr | None:
        return None if value is None or not value.get_secret_value().strip() else value

    @field_validator("worker_token")
    @classmethod
    def _long_worker_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < MIN_API_KEY_CHARS:
            raise ValueError(f"must be at least {MIN_API_KEY_CHARS} characters")
        return value

    @field_validator("webhook_secret")
    @classmethod
    def _standard_webhook_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            webhook_signing_key(value.get_secret_value())
        return value

    @field_validator("url_signing_secret")
    @classmethod
    def _long_signing_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < MIN_SIGNING_SECRET_CHARS:
            raise ValueError(f"must be at least {MIN_SIGNING_SECRET_CHARS} characters")
        return value

    @field_validator("api_keys", "admin_api_keys")
    @classmethod
    def _valid_api_keys(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            parse_api_keys(value.get_secret_value())
        return value

    @field_validator("auth_jwks_url")
    @classmethod
    def _https_jwks_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme == "https" and parts.hostname:
            return value
        if parts.scheme == "http" and parts.hostname in LOOPBACK_HOSTS:
            return value  # a key server on this machine (development, tests)
        raise ValueError("must be an https:// URL (http:// only on 127.0.0.1 or localhost)")

    @field_validator("cors_origins")
    @classmethod
    def _valid_origins(cls, value: str) -> str:
        origins = [origin.strip() for origin in value.split(",") if origin.strip()]
        if "*" in origins and len(origins) > 1:
            raise ValueError("'*' allows every origin; list origins or use '*' alone")
        for origin in origins:
            if origin != "*" and not _ORIGIN.fullmatch(origin):
                raise ValueError(f"{origin!r} is not an origin like https://app.example.com")
        return ",".join(origin.rstrip("/") for origin in origins)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_log_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("instance_name", mode="before")
    @classmethod
    def _blank_is_host_name(cls, value: object) -> object:
        return _default_instance_name() if isinstance(value, str) and not value.strip() else value

    @field_validator("instance_name")
    @classmethod
    def _valid_instance_name(cls, value: str) -> str:
        if not _INSTANCE_NAME.fullmatch(value):
            raise ValueError("must be 1-63 of A-Z, a-z, 0-9, '_', '.', '-'")
        return value

    @property
    def api_key_owners(self) -> dict[str, str]:
        """API_KEYS as key -> owner; empty when unset."""
        return parse_api_keys(self.api_keys.get_secret_value()) if self.api_keys else {}

    @property
    def admin_key_owners(self) -> dict[str, str]:
        """ADMIN_API_KEYS (operators) as key -> name; empty when unset."""
        keys = self.admin_api_keys
        return parse_api_keys(keys.get_secret_value()) if keys else {}

    @property
    def authentication_enabled(self) -> bool:
        """Whether /api requests need a key, a bearer token or a signed URL."""
        return bool(self.api_keys or self.admin_api_keys or self.auth_jwks_url)

    @property
    def cors_origin_list(self) -> list[str]:
        """Origins allowed to call the API from a browser."""
        return self.cors_origins.split(",") if self.cors_origins else []

    @property
    def effective_replicate_model(self) -> str:
        """REPLICATE_MODEL, or the Replicate model of LOCAL_MODEL_ID's family when unset."""
        return self.replicate_model or replicate_model_for(self.local_model_id)

    @property
    def effective_generation_workers(self) -> int:
        """Generations that run at once: GENERATION_WORKERS, or its default for the mode."""
        if self.generation_workers is not None:
            return self.generation_workers
        return WORKER_TIER_GENERATION_WORKERS if self.worker_url is not None else 1

    @model_validator(mode="after")
    def _s3_needs_bucket(self) -> Settings:
        if self.storage_backend == "s3" and self.storage_bucket is None:
            raise ValueError("STORAGE_BUCKET must be set when STORAGE_BACKEND=s3")
        return self

    @model_validator(mode="after")
    def _operators_apart(self) -> Settings:
        if set(self.api_key_owners) & set(self.admin_key_owners):
            raise ValueError("a key is in both API_KEYS and ADMIN_API_KEYS")
        return self

    @model_validator(mode="after")
    def _jwt_settings_together(self) -> Settings:
        given = [self.auth_jwks_url, self.auth_issuer, self.auth_audience]
        if any(given) and not all(given):
            raise ValueError("AUTH_JWKS_URL, AUTH_ISSUER and AUTH_AUDIENCE must be set together")
        return self

    @model_validator(mode="after")
    def _api_keys_need_a_signing_secret(self) -> Settings:
        # Image URLs must work in an <img src>, which cannot send X-API-Key: they are signed.
        if self.authentication_enabled and self.url_signing_secret is None:
            raise ValueError(
                "URL_SIGNING_SECRET (at least 32 characters) must be set when API_KEYS, "
                "ADMIN_API_KEYS or AUTH_JWKS_URL is set"
            )
        return self

    @model_validator(mode="after")
    def _worker_mode_needs_a_worker(self) -> Settings:
        if self.image_generator == "worker" and self.worker_url is None:
            raise ValueError("WORKER_URL must be set when IMAGE_GENERATOR=worker")
        if self.overflow_to_replicate and self.replicate_api_token is None:
            raise ValueError("OVERFLOW_TO_REPLICATE=true needs REPLICATE_API_TOKEN")
        return self


def load_settings(**overrides: object) -> Settings:
    """Build Settings from the environment (and overrides), with errors naming the setting."""
    try:
        return Settings(**overrides)
    except ValidationError as error:
        raise SettingsError(describe_validation_error(error)) from None


def describe_validation_error(error: ValidationError) -> str:
    """Turn a pydantic error into lines like `PRESIGNED_URL_EXPIRY=0: must be >= 1`."""
    lines = []
    for problem in error.errors():
        name = ".".join(str(part) for part in problem["loc"]).upper()
        message = problem["msg"].removeprefix("Value error, ")
        if name:
            shown = "<hidden>" if _SECRET_NAME.search(name) else repr(problem.get("input"))
            lines.append(f"{name}={shown}: {message}")
        else:
            lines.append(message)
    return "invalid setting: " + "; ".join(lines)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return load_settings()


def settings_or_exit() -> Settings:
    """The process-wide settings; a bad one ends the process with status 2 and a one-line
    reason naming it (clearer than a traceback when a server or command refuses to start)."""
    try:
        return get_settings()
    except SettingsError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
