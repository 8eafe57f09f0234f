"""`imap_security` against a real Dovecot serving a test CA's certificate: IMAPS (`tls`) and
STARTTLS on the plain port, the CA trusted through `ca_file`; a certificate from another CA is a
clear, reported refusal, and the password never shows."""
from __future__ import annotations

import pytest
import trustme
from test_imap_listener import REP, System, wait_for

from emulators.dovecot import Dovecot
from exchange_listener.listener import mailboxes


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("imap-pki")
    ca, other = trustme.CA(), trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    files = {"cert": root / "server.pem", "key": root / "server.key", "ca": root / "ca.pem",
             "other_ca": root / "other-ca.pem"}
    leaf.private_key_pem.write_to_path(str(files["key"]))
    with open(files["cert"], "wb") as fh:
        fh.writelines(blob.bytes() for blob in leaf.cert_chain_pems)
    ca.cert_pem.write_to_path(str(files["ca"]))
    other.cert_pem.write_to_path(str(files["other_ca"]))
    return {k: str(v) for k, v in files.items()}


@pytest.fixture(scope="module")
def tls_dovecot(tmp_path_factory, pki):
    with Dovecot(tmp_path_factory.mktemp("dovecot-tls"), tls_cert_file=pki["cert"], tls_key_file=pki["key"]) as server:
        server.add_users([REP])
        yield server


@pytest.fixture
def system(redis_server, redis_client, tls_dovecot, tmp_path):
    sys_ = System(redis_server, redis_client, tls_dovecot, tmp_path)
    yield sys_
    for proc in sys_.procs:
        proc.stop()


@pytest.mark.parametrize("security", ["tls", "starttls"])
def test_a_reply_is_read_over_tls_from_a_private_ca(system, pki, security):
    port = system.dovecot.tls_port if security == "tls" else system.dovecot.port
    system.run(imap_security=security, imap_port=port, ca_file=pki["ca"])
    system.reply(f"e-{security}")
    wait_for(lambda: system.stopped(f"e-{security}"), message=f"the reply read over {security}")
    assert system.once(f"e-{security}")


def test_a_certificate_from_another_ca_is_a_clear_refusal(system, pki):
    mailboxes.add(system.redis, [REP], source="imap")
    listener = system.start("listen", name="listener", imap_security="tls", imap_port=system.dovecot.tls_port,
                            ca_file=pki["other_ca"])
    wait_for(lambda: system.imap_info().get("failing_count") == 2, message="both folders refused")
    errors = {f["error"] for f in system.imap_info()["failing"]}
    assert all("CERTIFICATE_VERIFY_FAILED" in e or "certificate verify failed" in e for e in errors), errors
    assert system.dovecot.master_password not in listener.log_path.read_text()
