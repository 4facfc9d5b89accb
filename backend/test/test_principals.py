"""Who a request is: owners named by API keys, operators, bearer JWTs checked against an
identity provider's keys served by a real JWKS server on 127.0.0.1, and signed URLs.

Each app here gets a test-only route, /api/whoami, that returns the request's Principal.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from config import Settings, SettingsError, load_settings, parse_api_keys
from conftest import TEST_SIGNING_SECRET, assert_error_shape
from main import create_app
from mv.principals import PRINCIPAL
from services.asset_persistence import url_signer
from services.auth import InvalidTokenError, JwtVerifier

ISSUER = "https://id.example.test/"
AUDIENCE = "mv-backend"
ALICE_KEY = "alice-key-0123456789abcdef"
UNNAMED_KEY = "unnamed-key-0123456789abcdef"
OPERATOR_KEY = "operator-key-0123456789abcdef"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def public_jwk(key: Any, kid: str) -> dict[str, Any]:
    """The JWK of a private key's public half."""
    algorithm = (
        jwt.algorithms.RSAAlgorithm
        if isinstance(key, rsa.RSAPrivateKey)
        else (jwt.algorithms.ECAlgorithm)
    )
    return {**algorithm.to_jwk(key.public_key(), as_dict=True), "kid": kid, "use": "sig"}


class JwksServer:
    """An identity provider's key set on 127.0.0.1: what it serves can change; it counts
    the fetches."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = [public_jwk(RSA_KEY, "rsa-1"), public_jwk(EC_KEY, "ec-1")]
        self.fetches = 0
        self.status = 200
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.fetches += 1
                body = json.dumps({"keys": server.keys}).encode()
                self.send_response(server.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                """Quiet."""

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._http.server_address[1]}/.well-known/jwks.json"
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)

    def __enter__(self) -> JwksServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.shutdown()
        self._http.server_close()


@pytest.fixture
def jwks() -> Iterator[JwksServer]:
    with JwksServer() as server:
        yield server


def token(
    key: Any = RSA_KEY,
    *,
    kid: str = "rsa-1",
    algorithm: str = "RS256",
    **claims: Any,
) -> str:
    """A token for `sub` alice, valid for a minute, with `claims` changed (None: left out)."""
    now = int(time.time())
    body = {"sub": "alice", "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 60}
    body.update(claims)
    body = {name: value for name, value in body.items() if value is not None}
    return jwt.encode(body, key, algorithm=algorithm, headers={"kid": kid})


def whoami_app(settings: Settings) -> FastAPI:
    app = create_app(settings)

    @app.get("/api/whoami")
    async def whoami(request: Request) -> dict[str, Any]:
        return asdict(request.scope["state"][PRINCIPAL])

    return app


@pytest.fixture
def client(make_settings: Callable[..., Settings], jwks: JwksServer) -> Iterator[TestClient]:
    settings = make_settings(
        api_keys=f"alice:{ALICE_KEY},{UNNAMED_KEY}",
        admin_api_keys=f"ops:{OPERATOR_KEY}",
        auth_jwks_url=jwks.url,
        auth_issuer=ISSUER,
        auth_audience=AUDIENCE,
        url_signing_secret=TEST_SIGNING_SECRET,
    )
    with TestClient(whoami_app(settings)) as test_client:
        yield test_client


def whoami(client: TestClient, **headers: str) -> dict[str, Any]:
    reply = client.get("/api/whoami", headers=headers)
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_keys_name_their_owners_and_operators_act_for_everyone(client: TestClient) -> None:
    assert whoami(client, **{"X-API-Key": ALICE_KEY}) == {
        "owner": "alice",
        "operator": False,
        "credential": "api_key",
    }
    unnamed = whoami(client, **{"X-API-Key": UNNAMED_KEY})
    assert unnamed["owner"].startswith("key-") and UNNAMED_KEY not in unnamed["owner"]
    assert whoami(client, **{"X-API-Key": OPERATOR_KEY}) == {
        "owner": "ops",
        "operator": True,
        "credential": "admin_key",
    }


@pytest.mark.parametrize(
    ("key", "kid", "algorithm"), [(RSA_KEY, "rsa-1", "RS256"), (EC_KEY, "ec-1", "ES256")]
)
def test_a_bearer_token_makes_its_sub_the_owner(
    client: TestClient, jwks: JwksServer, key: Any, kid: str, algorithm: str
) -> None:
    bearer = {"Authorization": f"Bearer {token(key, kid=kid, algorithm=algorithm)}"}
    assert whoami(client, **bearer) == {"owner": "alice", "operator": False, "credential": "bearer"}
    assert whoami(client, **bearer)["owner"] == "alice"
    assert jwks.fetches == 1  # the key set is cached


def _hmac_signed_with_the_public_key() -> str:
    """The algorithm-confusion attack: HS256 with the server's public RSA key as secret."""
    pem = RSA_KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = {"alg": "HS256", "kid": "rsa-1", "typ": "JWT"}
    body = {"sub": "mallory", "iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 60}
    encode = jwt.utils.base64url_encode
    signing_input = b".".join(encode(json.dumps(part).encode()) for part in (header, body))
    signature = hmac.new(pem, signing_input, hashlib.sha256).digest()
    return (signing_input + b"." + encode(signature)).decode()


def _unsigned() -> str:
    encode = jwt.utils.base64url_encode
    header = encode(json.dumps({"alg": "none", "kid": "rsa-1"}).encode())
    body = encode(
        json.dumps(
            {"sub": "mallory", "iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 60}
        ).encode()
    )
    return (header + b"." + body + b".").decode()


REFUSED_TOKENS: dict[str, tuple[Callable[[], str], str]] = {
    "expired": (lambda: token(exp=int(time.time()) - 5), "expired"),
    "not yet valid": (lambda: token(nbf=int(time.time()) + 300), "not valid yet"),
    "wrong issuer": (lambda: token(iss="https://evil.example.test/"), "another issuer"),
    "wrong audience": (lambda: token(aud="another-service"), "another audience"),
    "no subject": (lambda: token(sub=None), "'sub'"),
    "no expiry": (lambda: token(exp=None), "'exp'"),
    "alg none": (_unsigned, "public-key algorithm"),
    "HMAC with the public key": (_hmac_signed_with_the_public_key, "public-key algorithm"),
    "unknown key": (
        lambda: token(rsa.generate_private_key(65537, 2048), kid="rsa-9"),
        "not one of",
    ),
    "signed by another key": (
        lambda: token(rsa.generate_private_key(65537, 2048), kid="rsa-1"),
        "signature",
    ),
    "not a token": (lambda: "not.a.token", "malformed"),
}


@pytest.mark.parametrize("case", list(REFUSED_TOKENS))
def test_every_bad_token_is_a_401_saying_why(client: TestClient, case: str) -> None:
    make, reason = REFUSED_TOKENS[case]
    reply = client.get("/api/whoami", headers={"Authorization": f"Bearer {make()}"})
    assert reply.status_code == 401
    detail = assert_error_shape(reply.json(), "InvalidToken")
    assert reason in detail["message"]
    assert reply.headers["WWW-Authenticate"].startswith('Bearer error="invalid_token"')


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Basic YWxpY2U6c2VjcmV0"},
        {"Authorization": "Bearer "},
        {"X-API-Key": ALICE_KEY + "x"},
    ],
    ids=["nothing", "basic", "empty bearer", "wrong key"],
)
def test_no_credential_is_a_401_naming_both_schemes(
    client: TestClient, headers: dict[str, str]
) -> None:
    reply = client.get("/api/whoami", headers=headers)
    assert reply.status_code == 401
    assert_error_shape(reply.json(), "Unauthorized")
    assert reply.headers["WWW-Authenticate"] == "ApiKey, Bearer"


def test_a_rotated_key_is_fetched_when_a_token_names_it(jwks: JwksServer) -> None:
    """The key set is cached; a token with an unknown key id fetches it again (here with no
    cooldown between fetches)."""
    verifier = JwtVerifier(jwks.url, ISSUER, AUDIENCE, refresh_cooldown_seconds=0)
    assert verifier.owner(token()) == "alice"
    assert verifier.owner(token()) == "alice"
    assert jwks.fetches == 1
    rotated = rsa.generate_private_key(65537, 2048)
    jwks.keys = [public_jwk(rotated, "rsa-2")]
    assert verifier.owner(token(rotated, kid="rsa-2", sub="bob")) == "bob"
    assert jwks.fetches == 2


def test_unknown_key_ids_do_not_hammer_the_provider(jwks: JwksServer) -> None:
    """Within the cooldown after a fetch, a token naming an unknown key id is refused from
    the cache: nothing is fetched, however many come."""
    verifier = JwtVerifier(jwks.url, ISSUER, AUDIENCE, refresh_cooldown_seconds=3600)
    assert verifier.owner(token()) == "alice"
    stranger = token(rsa.generate_private_key(65537, 2048), kid="rsa-7")
    for _ in range(5):
        with pytest.raises(InvalidTokenError, match="not one of"):
            verifier.owner(stranger)
    assert jwks.fetches == 1


def test_an_unreachable_identity_provider_is_a_503(
    make_settings: Callable[..., Settings], jwks: JwksServer
) -> None:
    jwks.status = 500
    settings = make_settings(
        auth_jwks_url=jwks.url,
        auth_issuer=ISSUER,
        auth_audience=AUDIENCE,
        url_signing_secret=TEST_SIGNING_SECRET,
    )
    with TestClient(whoami_app(settings)) as client:
        reply = client.get("/api/whoami", headers={"Authorization": f"Bearer {token()}"})
    assert reply.status_code == 503
    assert_error_shape(reply.json(), "IdentityProviderUnavailable")


def test_a_signed_url_is_a_capability_for_its_path(client: TestClient) -> None:
    settings: Settings = client.app.state.settings  # type: ignore[attr-defined]
    signer = url_signer(settings)
    assert signer is not None
    signed = signer.sign("/api/whoami")
    assert client.get(signed).json() == {
        "owner": None,
        "operator": True,
        "credential": "signed_url",
    }
    assert client.post(signed).status_code == 403  # signed URLs only read


def test_without_authentication_there_is_one_owner(make_settings: Callable[..., Settings]) -> None:
    with TestClient(whoami_app(make_settings())) as client:
        assert whoami(client) == {"owner": None, "operator": True, "credential": "none"}
        assert whoami(client, Authorization="Bearer whatever")["credential"] == "none"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"api_keys": f"al ice:{ALICE_KEY}"}, "owner name"),
        ({"api_keys": f"{ALICE_KEY},{ALICE_KEY}"}, "listed twice"),
        ({"api_keys": ALICE_KEY, "admin_api_keys": ALICE_KEY}, "in both"),
        ({"auth_jwks_url": "http://id.example.test/jwks"}, "https://"),
        ({"auth_jwks_url": "https://id.example.test/jwks"}, "set together"),
    ],
)
def test_unsafe_auth_settings_are_refused(overrides: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as error:
        load_settings(_env_file=None, url_signing_secret=TEST_SIGNING_SECRET, **overrides)
    assert message in str(error.value)
    assert ALICE_KEY not in str(error.value)


def test_an_unnamed_key_owner_is_a_digest_never_the_key() -> None:
    owners = parse_api_keys(f"{UNNAMED_KEY}, bob:{ALICE_KEY}")
    assert owners[ALICE_KEY] == "bob"
    assert owners[UNNAMED_KEY] == parse_api_keys(UNNAMED_KEY)[UNNAMED_KEY]
    assert UNNAMED_KEY not in owners[UNNAMED_KEY]
