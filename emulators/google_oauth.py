"""Google's OAuth2 token endpoint for a service account with domain-wide delegation, over HTTP.

What it serves, as Google documents it for server-to-server apps:

- ``POST /token`` with ``grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer`` and
  ``assertion=<JWT>``: the RS256 signature is verified with the service account's public key
  (``kid`` must be its ``private_key_id``); ``iss`` must be the account's ``client_email``, ``aud``
  Google's token URI (``https://oauth2.googleapis.com/token``, which google-auth always sends) or
  this server's own, ``scope`` must hold ``https://mail.google.com/``, ``iat``/``exp`` a lifetime of at
  most an hour around now, ``sub`` the mailbox to impersonate, in a delegated domain. Success is 200
  ``{"access_token", "expires_in": 3600, "token_type": "Bearer"}``; a refusal is 400 ``{"error",
  "error_description"}`` (``invalid_grant``, ``unauthorized_client`` for a domain not delegated,
  ``invalid_scope``, ``unsupported_grant_type``, ``invalid_request``).
- ``POST``/``GET /introspect`` (RFC 7662 style, for Dovecot's oauth2 passdb): ``token`` as a form
  field, query parameter or bearer header; ``{"active": true, "email": SUB, "sub": SUB, "scope",
  "exp"}`` for a live token, else ``{"active": false}``.

Test hooks: ``POST /emulator/revoke?sub=EMAIL`` ends that mailbox's tokens (all without ``sub``),
``GET /emulator/stats`` (grants, refusals, introspections).

Where it knowingly differs: one service account; the refusal texts are close to Google's, not
guaranteed verbatim; tokens live in this process only.

Run: ``python -m emulators.google_oauth --port N --public-key PEM --client-email E --domain D``;
the ``GoogleOAuth`` launcher does that and writes the service-account JSON file.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import secrets
import signal
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from typing import TYPE_CHECKING, Any, Self

from emulators.services import _EmulatorProcess

if TYPE_CHECKING:
    from aiohttp import web

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
MAIL_SCOPE = "https://mail.google.com/"
TOKEN_SECONDS = 3600
# what Google accepts as ``aud``: google-auth always sends the first, whatever its token_uri
GOOGLE_TOKEN_AUDIENCES = ("https://oauth2.googleapis.com/token", "https://www.googleapis.com/oauth2/v4/token",
                          "https://accounts.google.com/o/oauth2/token")


class TokenServer:
    """The endpoint's state: the account's public key, delegated domains, tokens handed out."""

    def __init__(self, public_key_pem: bytes, client_email: str, key_id: str, domains: list[str]):
        self.public_key_pem = public_key_pem
        self.client_email = client_email
        self.key_id = key_id
        self.domains = [d.lower() for d in domains]  # empty: every domain is delegated
        self.tokens: dict[str, dict[str, Any]] = {}
        self.stats: collections.Counter[str] = collections.Counter(grants=0, refusals=0, introspections=0)

    def _refuse(self, error: str, description: str, status: int = 400) -> web.Response:
        from aiohttp import web

        self.stats["refusals"] += 1
        return web.json_response({"error": error, "error_description": description}, status=status)

    async def token(self, request: web.Request) -> web.Response:
        import jwt
        from aiohttp import web

        form = await request.post()
        if form.get("grant_type") != JWT_BEARER:
            return self._refuse("unsupported_grant_type", f"Invalid grant_type: {form.get('grant_type', '')}")
        assertion = form.get("assertion")
        if not isinstance(assertion, str) or not assertion:
            return self._refuse("invalid_request", "Missing required parameter: assertion")
        try:
            header = jwt.get_unverified_header(assertion)
        except jwt.PyJWTError:
            return self._refuse("invalid_grant", "Invalid JWT: could not be parsed.")
        if header.get("alg") != "RS256" or header.get("kid", self.key_id) != self.key_id:
            return self._refuse("invalid_grant", "Invalid JWT Signature.")
        token_url = f"{request.scheme}://{request.host}{request.path}"
        try:
            claims = jwt.decode(assertion, self.public_key_pem, algorithms=["RS256"],
                                options={"verify_aud": False, "verify_exp": False, "verify_iat": False})
        except jwt.PyJWTError:
            return self._refuse("invalid_grant", "Invalid JWT Signature.")
        if claims.get("iss") != self.client_email:
            return self._refuse("invalid_grant", "Invalid JWT: iss is not a known service account.")
        if claims.get("aud") not in (*GOOGLE_TOKEN_AUDIENCES, token_url):
            return self._refuse("invalid_grant", "Invalid JWT: Failed audience check.")
        now = time.time()
        iat, exp = claims.get("iat"), claims.get("exp")
        if (not isinstance(iat, (int, float)) or not isinstance(exp, (int, float)) or exp <= iat
                or exp - iat > TOKEN_SECONDS or iat > now + 300 or exp < now - 300):
            return self._refuse("invalid_grant", "Invalid JWT: Token must be a short-lived token (60 minutes) "
                                "and in a reasonable timeframe. Check your iat and exp values in the JWT claim.")
        scopes = str(claims.get("scope", "")).split()
        if not scopes:
            return self._refuse("invalid_scope", "Invalid OAuth scope or ID token audience provided.")
        sub = claims.get("sub")
        if not isinstance(sub, str) or "@" not in sub:
            return self._refuse("invalid_grant", "Invalid email or User ID")
        if MAIL_SCOPE not in scopes or (self.domains and sub.rsplit("@", 1)[1].lower() not in self.domains):
            return self._refuse("unauthorized_client", "Client is unauthorized to retrieve access tokens using "
                                "this method, or client not authorized for any of the scopes requested.")
        access_token = "ya29.emu-" + secrets.token_urlsafe(32)
        self.tokens[access_token] = {"sub": sub, "scope": " ".join(scopes), "exp": int(now) + TOKEN_SECONDS}
        self.stats["grants"] += 1
        return web.json_response({"access_token": access_token, "expires_in": TOKEN_SECONDS,
                                  "token_type": "Bearer"})

    async def introspect(self, request: web.Request) -> web.Response:
        from aiohttp import web

        self.stats["introspections"] += 1
        token = request.query.get("token", "")
        if request.method == "POST":
            form = await request.post()
            token = str(form.get("token", token))
        auth = request.headers.get("Authorization", "")
        if not token and auth.lower().startswith("bearer "):
            token = auth[7:].strip()
        entry = self.tokens.get(token)
        if entry is None or entry["exp"] <= time.time():
            return web.json_response({"active": False})
        return web.json_response({"active": True, "email": entry["sub"], "sub": entry["sub"],
                                  "scope": entry["scope"], "exp": entry["exp"], "token_type": "Bearer"})

    async def revoke(self, request: web.Request) -> web.Response:
        from aiohttp import web

        sub = request.query.get("sub")
        gone = [t for t, e in self.tokens.items() if sub is None or e["sub"] == sub]
        for token in gone:
            del self.tokens[token]
        return web.json_response({"revoked": len(gone)})

    async def get_stats(self, request: web.Request) -> web.Response:
        from aiohttp import web

        return web.json_response({**self.stats, "tokens": len(self.tokens), "pid": os.getpid()})

    def app(self) -> web.Application:
        from aiohttp import web

        app = web.Application()
        app.router.add_post("/token", self.token)
        app.router.add_route("*", "/introspect", self.introspect)
        app.router.add_post("/emulator/revoke", self.revoke)
        app.router.add_get("/emulator/stats", self.get_stats)
        return app


def main(argv: list[str] | None = None) -> None:
    from aiohttp import web

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--public-key", required=True, help="PEM file of the service account's public key")
    parser.add_argument("--client-email", required=True)
    parser.add_argument("--key-id", required=True)
    parser.add_argument("--domain", action="append", default=[], help="a delegated domain (none: all)")
    args = parser.parse_args(argv)
    with open(args.public_key, "rb") as fh:
        server = TokenServer(fh.read(), args.client_email, args.key_id, args.domain)

    async def serve() -> None:
        runner = web.AppRunner(server.app(), access_log=None, shutdown_timeout=1.0, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, args.host, args.port, reuse_address=True).start()
        print(f"Google OAuth emulator serving on http://{args.host}:{args.port}/token", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()

    asyncio.run(serve())


class GoogleOAuth(_EmulatorProcess):
    """The emulator as a child process on a free port, with a fresh service-account key pair."""

    name = "google oauth emulator"

    def __init__(self, port: int | None = None, *, client_email: str = "listener@el-test.iam.gserviceaccount.com",
                 project_id: str = "el-test", delegated_domains: tuple[str, ...] | list[str] = (),
                 workdir: str | None = None):
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        super().__init__(port)
        self.client_email, self.project_id = client_email, project_id
        self.client_id = str(100000000000000000000 + secrets.randbelow(10**20))
        self.delegated_domains = list(delegated_domains)
        self.private_key_id = secrets.token_hex(20)
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.private_key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()).decode()
        self._own_workdir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix="el-google-")
        self.public_key_file = os.path.join(self.workdir, "service-account-public.pem")
        with open(self.public_key_file, "wb") as fh:
            fh.write(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo))

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def token_url(self) -> str:
        return f"{self.base_url}/token"

    @property
    def introspection_url(self) -> str:
        return f"{self.base_url}/introspect"

    def service_account_info(self, token_uri: str | None = None) -> dict[str, str]:
        """The service-account key JSON Google's console hands out (with this emulator's URI)."""
        return {"type": "service_account", "project_id": self.project_id, "private_key_id": self.private_key_id,
                "private_key": self.private_key_pem, "client_email": self.client_email,
                "client_id": self.client_id, "auth_uri": "https://accounts.google.com/o/oauth2/auth",
                "token_uri": token_uri or self.token_url,
                "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs"}

    def write_service_account_file(self, path: str | os.PathLike[str], token_uri: str | None = None) -> str:
        """Write the service-account JSON (0600: it holds the private key); returns the path."""
        fd = os.open(os.fspath(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(self.service_account_info(token_uri), fh, indent=2)
        return os.fspath(path)

    def start(self) -> Self:
        args = [sys.executable, "-m", "emulators.google_oauth", "--port", str(self.port),
                "--public-key", self.public_key_file, "--client-email", self.client_email,
                "--key-id", self.private_key_id]
        for domain in self.delegated_domains:
            args += ["--domain", domain]
        self._launch(args, "Google OAuth emulator serving")
        return self

    def _call(self, method: str, path: str) -> dict:
        req = urllib.request.Request(f"{self.base_url}{path}", data=b"" if method == "POST" else None,
                                     method=method)
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def revoke(self, sub: str | None = None) -> int:
        """End the tokens of ``sub`` (every token without it); returns how many."""
        query = f"?{urllib.parse.urlencode({'sub': sub})}" if sub else ""
        return int(self._call("POST", f"/emulator/revoke{query}")["revoked"])

    def stats(self) -> dict:
        return self._call("GET", "/emulator/stats")

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self._own_workdir:
            import shutil

            shutil.rmtree(self.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
