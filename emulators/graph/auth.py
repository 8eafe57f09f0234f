"""The token host (Entra ID's part): OIDC discovery, the client-credentials grant with a secret or a
certificate-signed client assertion, and the access tokens the Graph side checks.

msal only talks to an https authority, so the host is served with a throwaway CA made by
``trustme`` (``tls_context``); the CA certificate goes to a file the client trusts.
"""
from __future__ import annotations

import base64
import datetime as dt
import hmac
import secrets
import ssl
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from emulators.graph.errors import GraphError

GRAPH_APP_ID = "00000003-0000-0000-c000-000000000000"
GRAPH_RESOURCES = ("https://graph.microsoft.com", GRAPH_APP_ID, "https://graph.microsoft.com/")
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_ALGORITHMS = ["RS256", "PS256"]  # msal: PS256 with x5t#S256 given a certificate, else RS256 with x5t
WWW_AUTHENTICATE = ('Bearer realm="", authorization_uri="https://login.microsoftonline.com/common/oauth2/authorize", '
                    f'client_id="{GRAPH_APP_ID}"')


class TokenError(Exception):
    """A refusal in Entra's shape: ``{"error", "error_description": "AADSTSnnn: ...", "error_codes", ...}``."""

    def __init__(self, status: int, error: str, code: int, text: str):
        super().__init__(text)
        self.status, self.error, self.code, self.text = status, error, code, text

    def body(self) -> dict[str, Any]:
        trace, correlation = str(uuid.uuid4()), str(uuid.uuid4())
        now = dt.datetime.now(dt.UTC)
        return {"error": self.error,
                "error_description": f"AADSTS{self.code}: {self.text} Trace ID: {trace} Correlation ID: {correlation} "
                                     f"Timestamp: {now:%Y-%m-%d %H:%M:%SZ}",
                "error_codes": [self.code], "timestamp": f"{now:%Y-%m-%d %H:%M:%SZ}", "trace_id": trace,
                "correlation_id": correlation, "error_uri": f"https://login.microsoftonline.com/error?code={self.code}"}


def _thumbprint(cert: x509.Certificate, algorithm) -> str:
    return base64.urlsafe_b64encode(cert.fingerprint(algorithm)).decode().rstrip("=")


def load_certificates(pem: bytes) -> list[x509.Certificate]:
    """Every certificate in a PEM file (a private key beside them is ignored)."""
    certs = x509.load_pem_x509_certificates(pem)
    if not certs:
        raise ValueError("no certificate in the PEM data")
    return certs


class Authority:
    def __init__(self, tenant: str, client_id: str, client_secret: str | None,
                 certificates: list[x509.Certificate], lifetime: int):
        self.tenant, self.client_id, self.client_secret = tenant, client_id, client_secret
        self.certificates = certificates
        self.lifetime = lifetime
        self._key = secrets.token_bytes(32)  # signs this process's access tokens
        self.app_object_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"graph-emulator:{tenant}:{client_id}"))
        self.counts = {"token_grants": 0, "token_refusals": 0}

    # -- the token host --------------------------------------------------------------------
    def discovery(self, base: str) -> dict[str, Any]:
        """``GET /{tenant}/v2.0/.well-known/openid-configuration``, the document msal reads first."""
        t = f"{base}/{self.tenant}"
        return {
            "token_endpoint": f"{t}/oauth2/v2.0/token",
            "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt", "client_secret_basic"],
            "jwks_uri": f"{t}/discovery/v2.0/keys", "response_modes_supported": ["query", "fragment", "form_post"],
            "subject_types_supported": ["pairwise"], "id_token_signing_alg_values_supported": ["RS256"],
            "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"], "issuer": f"{t}/v2.0",
            "request_uri_parameter_supported": False, "userinfo_endpoint": "https://graph.microsoft.com/oidc/userinfo",
            "authorization_endpoint": f"{t}/oauth2/v2.0/authorize",
            "device_authorization_endpoint": f"{t}/oauth2/v2.0/devicecode", "http_logout_supported": True,
            "frontchannel_logout_supported": True, "end_session_endpoint": f"{t}/oauth2/v2.0/logout",
            "claims_supported": ["sub", "iss", "aud", "exp", "iat", "nbf", "tid", "ver"],
            "kerberos_endpoint": f"{t}/kerberos", "tenant_region_scope": "EU",
            "cloud_instance_name": "microsoftonline.com", "cloud_graph_host_name": "graph.windows.net",
            "msgraph_host": "graph.microsoft.com", "rbac_url": "https://pas.windows.net"}

    def check_tenant(self, tenant: str) -> None:
        if tenant.lower() != self.tenant.lower():
            raise TokenError(400, "invalid_tenant", 90002, f"Tenant '{tenant}' not found. Check to make sure you have "
                             "the correct tenant ID and are signing into the correct cloud.")

    def grant(self, tenant: str, form: dict[str, str], basic: tuple[str, str] | None) -> dict[str, Any]:
        """The client-credentials grant; a refusal raises TokenError."""
        try:
            self.check_tenant(tenant)
            if form.get("grant_type") != "client_credentials":
                raise TokenError(400, "unsupported_grant_type", 70003,
                                 "The app requested an unsupported grant type.")
            client_id = form.get("client_id") or (basic[0] if basic else "")
            if client_id != self.client_id:
                raise TokenError(400, "unauthorized_client", 700016,
                                 f"Application with identifier '{client_id}' was not found in the directory "
                                 f"'{self.tenant}'.")
            scope = form.get("scope", "")
            if not scope.endswith("/.default") or scope[:-len("/.default")] not in GRAPH_RESOURCES:
                raise TokenError(400, "invalid_scope", 1002012,
                                 f"The provided value for scope {scope} is not valid. Client credential flows must "
                                 "have a scope value with /.default suffixed to the resource identifier (application "
                                 "ID URI).")
            secret = form.get("client_secret") or (basic[1] if basic else None)
            assertion = form.get("client_assertion")
            if assertion is not None:
                if form.get("client_assertion_type") != ASSERTION_TYPE:
                    raise TokenError(400, "invalid_request", 900144,
                                     "The request body must contain the following parameter: 'client_assertion_type'.")
                self._check_assertion(assertion, tenant)
            elif secret is not None:
                if self.client_secret is None or not hmac.compare_digest(secret.encode(), self.client_secret.encode()):
                    raise TokenError(401, "invalid_client", 7000215,
                                     "Invalid client secret provided. Ensure the secret being sent in the request is "
                                     "the client secret value, not the client secret ID, for a secret added to app "
                                     f"'{self.client_id}'.")
            else:
                raise TokenError(401, "invalid_client", 7000218, "The request body must contain the following "
                                 "parameter: 'client_assertion' or 'client_secret'.")
        except TokenError:
            self.counts["token_refusals"] += 1
            raise
        self.counts["token_grants"] += 1
        return {"token_type": "Bearer", "expires_in": self.lifetime, "ext_expires_in": self.lifetime,
                "access_token": self._access_token()}

    def _check_assertion(self, assertion: str, tenant: str) -> None:
        if not self.certificates:
            raise TokenError(401, "invalid_client", 700027, "Client assertion contains an invalid signature. "
                             f"No certificate is registered on application '{self.client_id}'.")
        try:
            header = jwt.get_unverified_header(assertion)
        except jwt.PyJWTError:
            raise TokenError(401, "invalid_client", 50027, "JWT token is invalid or malformed.") from None
        candidates = self.certificates
        if header.get("x5t#S256"):
            wanted = str(header["x5t#S256"]).rstrip("=")
            candidates = [c for c in candidates if _thumbprint(c, hashes.SHA256()) == wanted]
        elif header.get("x5t"):
            wanted = str(header["x5t"]).rstrip("=")
            candidates = [c for c in candidates if _thumbprint(c, hashes.SHA1()) == wanted]
        if not candidates:
            raise TokenError(401, "invalid_client", 700027, "Client assertion failed signature validation. The "
                             "certificate with identifier used to sign the client assertion is not registered on "
                             f"application '{self.client_id}'.")
        if header.get("alg") not in ASSERTION_ALGORITHMS:
            raise TokenError(401, "invalid_client", 5002738, f"Invalid JWT token. '{header.get('alg')}' is not a "
                             "supported signature algorithm.")
        claims = None
        for cert in candidates:
            try:
                claims = jwt.decode(assertion, cert.public_key(), algorithms=ASSERTION_ALGORITHMS,  # type: ignore[arg-type]
                                    options={"verify_aud": False, "verify_exp": False, "verify_nbf": False,
                                             "verify_iat": False})
                break
            except jwt.InvalidSignatureError:
                continue
            except jwt.PyJWTError:
                raise TokenError(401, "invalid_client", 50027, "JWT token is invalid or malformed.") from None
        if claims is None:
            raise TokenError(401, "invalid_client", 700027, "Client assertion failed signature validation.")
        if claims.get("iss") != self.client_id or claims.get("sub") != self.client_id:
            raise TokenError(401, "invalid_client", 700023, "Client assertion issuer and subject must be the "
                             "application's client id.")
        audience = claims.get("aud")
        parts = urlsplit(audience) if isinstance(audience, str) else None
        if parts is None or parts.scheme != "https" or parts.path.lower() != f"/{tenant.lower()}/oauth2/v2.0/token":
            raise TokenError(401, "invalid_client", 700212, "Client assertion audience claim does not match the token "
                             "endpoint.")
        now = time.time()
        expires, not_before = claims.get("exp"), claims.get("nbf", now)
        if not isinstance(expires, (int, float)) or expires < now - 300 or not_before > now + 300:
            raise TokenError(401, "invalid_client", 700024, "Client assertion is not within its valid time range.")

    def _access_token(self) -> str:
        now = int(time.time())
        return jwt.encode({"aud": "https://graph.microsoft.com", "iss": f"https://sts.windows.net/{self.tenant}/",
                           "iat": now, "nbf": now, "exp": now + self.lifetime, "appid": self.client_id,
                           "idtyp": "app", "oid": self.app_object_id, "sub": self.app_object_id,
                           "roles": ["Mail.Read"], "tid": self.tenant, "ver": "1.0",
                           "uti": secrets.token_urlsafe(16)}, self._key, algorithm="HS256")

    # -- the Graph side --------------------------------------------------------------------
    def check(self, authorization: str | None) -> dict[str, Any]:
        """The claims of a valid ``Authorization: Bearer`` token, else 401 InvalidAuthenticationToken."""
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise _unauthenticated("Access token is empty.")
        if token.count(".") != 2:
            raise _unauthenticated("IDX14100: JWT is not well formed, there are no dots (.).")
        try:
            return jwt.decode(token, self._key, algorithms=["HS256"], audience="https://graph.microsoft.com")
        except jwt.ExpiredSignatureError:
            raise _unauthenticated("Lifetime validation failed, the token is expired.") from None
        except jwt.InvalidAudienceError:
            raise _unauthenticated("Access token validation failure. Invalid audience.") from None
        except jwt.PyJWTError:
            raise _unauthenticated("Access token validation failure.") from None


def _unauthenticated(message: str) -> GraphError:
    return GraphError(401, "InvalidAuthenticationToken", message, headers={"WWW-Authenticate": WWW_AUTHENTICATE})


def tls_context(hosts: list[str], ca_file: str) -> ssl.SSLContext:
    """A server context for ``hosts`` signed by a fresh CA, whose certificate is written to ``ca_file``."""
    import trustme

    ca = trustme.CA(organization_name="exchange-listener graph emulator")
    names = list(dict.fromkeys(hosts + ["127.0.0.1", "localhost"]))
    cert = ca.issue_cert(*names)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    ca.cert_pem.write_to_path(ca_file)
    return context

