"""A real Dovecot IMAP server for tests, benchmarks and the demo, run from a temp config.

Dovecot 2.3 (Debian 12's ``dovecot-imapd``) as a child process on a free loopback port, with all
its state under one directory: users in a passwd-file (maildir homes), a master user so the
harness can act as any user (``LOGIN "rep@x*master" secret`` or SASL PLAIN with an authzid), and
optionally an oauth2 passdb that checks XOAUTH2/OAUTHBEARER tokens against an introspection URL
(``emulators.google_oauth``). The helpers change the server the way the world does: deliver,
move, expunge, recreate a folder (new UIDVALIDITY), cut connections, refuse a login, crash.
"""
from __future__ import annotations

import grp
import imaplib
import os
import pathlib
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Self

from emulators.services import free_port, wait_for_port

HARNESS_MASTER = "el-harness"
PER_IMAP_PROCESS = 50  # clients one imap process serves when sized with ``scale_connections``
SPECIAL_FOLDERS = {"Junk": "\\Junk", "Sent": "\\Sent", "Drafts": "\\Drafts", "Trash": "\\Trash"}


def find_dovecot() -> str | None:
    """The ``dovecot`` binary (PATH, then /usr/sbin, where Debian puts it), or None."""
    found = shutil.which("dovecot") or ("/usr/sbin/dovecot" if os.access("/usr/sbin/dovecot", os.X_OK) else None)
    return found


def _doveadm_binary(dovecot: str) -> str:
    found = shutil.which("doveadm")
    if found:
        return found
    for candidate in ("/usr/bin/doveadm", os.path.join(os.path.dirname(dovecot), "doveadm")):
        if os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError("doveadm not found next to dovecot (Debian/Ubuntu: apt-get install dovecot-core)")


def _quote(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


class Dovecot:
    """A Dovecot child (``dovecot -F -c FILE``) in its own process group on ``host:port``."""

    host = "127.0.0.1"

    def __init__(self, root: pathlib.Path | str | None = None, *, port: int | None = None,
                 master_user: str = "master", master_password: str = "master-secret",
                 oauth2_introspection_url: str | None = None, scale_connections: int | None = None,
                 tls_cert_file: str | None = None, tls_key_file: str | None = None):
        binary = find_dovecot()
        if binary is None:
            raise RuntimeError("dovecot not found: install it (Debian/Ubuntu: apt-get install dovecot-imapd; "
                               "the tests start their own server from a temp config)")
        self.binary = binary
        self.doveadm = _doveadm_binary(binary)
        version = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout.strip()
        self.version = version
        if not version.startswith("2.3"):
            raise RuntimeError(f"Dovecot {version}: only the 2.3 config template is written "
                               "(Dovecot 2.4 config template not written yet)")
        self._own_root = root is None
        self.root = pathlib.Path(root or tempfile.mkdtemp(prefix="el-dovecot-"))
        self.root.mkdir(parents=True, exist_ok=True)
        # base_dir (unix sockets: short path) and the mail homes must be reachable by the
        # unprivileged login and mail processes, and a pytest tmp dir is 0700 root: a short
        # world-traversable dir of our own for them.
        self.run_dir = pathlib.Path(tempfile.mkdtemp(prefix="el-dc-"))
        os.chmod(self.run_dir, 0o755)
        self.port = port or free_port()
        self.master_user, self.master_password = master_user, master_password
        self.oauth2_introspection_url = oauth2_introspection_url
        # sized for this many concurrent IMAP connections (None: Dovecot's defaults, one imap
        # process per connection); see ``_scale_config``
        self.scale_connections = scale_connections
        # TLS (a test CA's certificate): IMAPS on ``tls_port`` and STARTTLS on ``port``
        self.tls_cert_file, self.tls_key_file = tls_cert_file, tls_key_file
        self.tls_port = free_port() if tls_cert_file else 0
        if os.geteuid() == 0:
            self.system_user, self.uid, self.gid = "nobody", 65534, 65534
            try:
                entry = pwd.getpwnam("nobody")
                self.uid, self.gid = entry.pw_uid, entry.pw_gid
            except KeyError:
                pass
        else:  # an ordinary user runs everything as itself
            entry = pwd.getpwuid(os.getuid())
            self.system_user, self.uid, self.gid = entry.pw_name, entry.pw_uid, entry.pw_gid
        self.config = self.root / "dovecot.conf"
        # read by the auth process, which runs as the unprivileged user
        self.users_file = self.run_dir / "users"
        self.denied_file = self.run_dir / "denied-users"
        self.masters_file = self.run_dir / "master-users"
        self.log_path = self.root / "dovecot.log"
        self.proc: subprocess.Popen | None = None
        self._stamps: dict[pathlib.Path, float] = {}
        self.harness_password = os.urandom(12).hex()  # the harness's own master login, never refused
        self.special_folders = dict(SPECIAL_FOLDERS)
        self._init_files()
        self._write_config()

    # --- process ---------------------------------------------------------------------------

    @property
    def home_dir(self) -> pathlib.Path:
        return self.run_dir / "home"

    def _init_files(self) -> None:
        for path in (self.run_dir / "base", self.root / "state", self.home_dir):
            path.mkdir(parents=True, exist_ok=True)
        os.chmod(self.home_dir, 0o755)
        for path in (self.users_file, self.denied_file):
            path.touch()
        self.masters_file.write_text(f"{self.master_user}:{{PLAIN}}{self.master_password}\n"
                                     f"{HARNESS_MASTER}:{{PLAIN}}{self.harness_password}\n")
        for path in (self.users_file, self.denied_file, self.masters_file):
            self._protect(path)

    def _write_config(self) -> None:
        oauth2 = ""
        if self.oauth2_introspection_url:
            oauth2_conf = self.root / "oauth2.conf.ext"
            oauth2_conf.write_text(
                f"introspection_url = {self.oauth2_introspection_url}\n"
                "introspection_mode = post\n"
                "force_introspection = yes\n"
                "username_attribute = email\n"
                "active_attribute = active\n"
                "active_value = true\n"
                "tokeninfo_url =\n")
            oauth2 = ("passdb {\n  driver = oauth2\n  mechanisms = xoauth2 oauthbearer\n"
                      f"  args = {oauth2_conf}\n}}\n")
        special = "".join(
            f'  mailbox "{name}" {{\n    auto = {"subscribe" if name in SPECIAL_FOLDERS else "no"}\n'
            f"    special_use = {use}\n  }}\n"
            for name, use in self.special_folders.items())
        self.config.write_text(f"""# written by emulators/dovecot.py (Dovecot 2.3 syntax)
base_dir = {self.run_dir / "base"}
state_dir = {self.root / "state"}
log_path = {self.log_path}
info_log_path = {self.log_path}
protocols = imap
listen = {self.host}
{self._ssl_config()}
disable_plaintext_auth = no
auth_mechanisms = plain login xoauth2 oauthbearer
auth_master_user_separator = *
auth_cache_size = 0
# a refused login answers at once (Dovecot waits 2 s by default): tests refuse on purpose
auth_failure_delay = 0
default_internal_user = {self.system_user}
default_internal_group = {grp.getgrgid(self.gid).gr_name}
default_login_user = {self.system_user}
first_valid_uid = {min(self.uid, 65534)}
mail_location = maildir:~/Maildir
# CREATE-SPECIAL-USE keeps a folder's use as a mailbox attribute
mail_attribute_dict = file:%h/Maildir/dovecot-attributes
mail_max_userip_connections = 2000
shutdown_clients = yes
namespace inbox {{
  inbox = yes
  separator = /
{special}}}
passdb {{
  driver = passwd-file
  deny = yes
  # keyed by user and master user: a refused user's entries are "USER" and "USER*MASTER", so
  # the harness's own master login still reaches the mailbox
  args = username_format=%u%{{master_user}} {self.denied_file}
}}
passdb {{
  driver = passwd-file
  master = yes
  pass = yes
  args = scheme=PLAIN username_format=%u {self.masters_file}
}}
{oauth2}passdb {{
  driver = passwd-file
  mechanisms = plain login
  args = scheme=PLAIN username_format=%u {self.users_file}
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {self.users_file}
  default_fields = uid={self.uid} gid={self.gid} home={self.home_dir}/%u
}}
service imap-login {{
  chroot =
  inet_listener imap {{
    address = {self.host}
    port = {self.port}
  }}
  inet_listener imaps {{
    address = {self.host}
    port = {self.tls_port}
    ssl = {"yes" if self.tls_port else "no"}
  }}
}}
service anvil {{
  chroot =
  # no growing per-IP delay after failed logins (every test client comes from 127.0.0.1)
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
service imap {{
  process_limit = 4096
}}
{self._scale_config()}""")

    def _scale_config(self) -> str:
        """Settings for ``scale_connections`` concurrent connections (a benchmark's thousands of
        IDLEs), or "" when not asked for. By default Dovecot runs one imap process per connection
        (~3-5 MB each, and one inotify instance each, of the 128 a user gets by default); here an
        imap process serves up to ``PER_IMAP_PROCESS`` clients and the login processes run in
        high-performance mode (each proxies many clients), so thousands of connections cost a few
        dozen processes. Later blocks of the same service override the earlier ones."""
        if not self.scale_connections:
            return ""
        n = self.scale_connections
        per_imap = PER_IMAP_PROCESS
        imap_processes = n // per_imap + 16
        logins = max(1, min(4, os.cpu_count() or 1))
        return f"""# sized for {n} concurrent connections (scale_connections)
default_client_limit = {2 * n + 1000}
default_process_limit = {imap_processes + 100}
mail_max_userip_connections = {n + 100}
service imap-login {{
  service_count = 0
  process_min_avail = {logins}
  client_limit = {n + 1000}
  vsz_limit = 1G
}}
service imap {{
  service_count = 0
  client_limit = {per_imap}
  process_limit = {imap_processes}
  vsz_limit = 1G
}}
service auth {{
  client_limit = {2 * n + 1000}
}}
service anvil {{
  client_limit = {2 * n + 1000}
}}
"""

    def _ssl_config(self) -> str:
        if not self.tls_cert_file:
            return "ssl = no"
        # both files are read by the master process (root) at start
        return f"ssl = yes\nssl_cert = <{self.tls_cert_file}\nssl_key = <{self.tls_key_file}"

    def start(self) -> Self:
        """``dovecot -F -c FILE`` in its own process group; returns once it accepts connections."""
        if self.alive():
            return self
        base = self.run_dir / "base"  # runtime state only: after a crash, start clean
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir()
        self.proc = subprocess.Popen([self.binary, "-F", "-c", str(self.config)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, start_new_session=True)
        try:
            wait_for_port(self.port, timeout=15, proc=self.proc)
        except (RuntimeError, TimeoutError) as exc:
            exited = self.proc.poll() is not None and self.proc.stderr is not None
            err = self.proc.stderr.read().decode(errors="replace") if exited and self.proc.stderr else ""
            self.kill()
            raise RuntimeError(f"dovecot did not start: {exc}; {err.strip()}; log: {self.log_tail()}") from exc
        return self

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _signal_group(self, sig: int, timeout: float) -> None:
        if self.proc is None:
            return
        try:
            if sig == signal.SIGTERM:
                # the master alone: it stops its children in order (a SIGTERM to the whole group
                # at once can leave its log process waiting seconds for a client)
                self.proc.send_signal(sig)
            else:
                os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        try:  # what outlives the master (imap children hold the listening socket for seconds)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(5)
        # imap children may outlive the master a few seconds, holding the listening socket
        deadline, killed = time.monotonic() + timeout, False
        while self._group_alive(self.proc.pid):
            if time.monotonic() >= deadline:
                if killed:
                    raise RuntimeError(f"dovecot's processes (group {self.proc.pid}) outlive SIGKILL")
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                deadline, killed = time.monotonic() + 5, True
            time.sleep(0.02)
        if self.proc.stderr:
            self.proc.stderr.close()

    @staticmethod
    def group_pids(pgid: int) -> list[int]:
        """The live (not zombie) processes of the group: dead children are reparented and may
        wait a while to be reaped, which ``killpg(pgid, 0)`` cannot tell apart."""
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                found.append(int(entry))
        return found

    @classmethod
    def _group_alive(cls, pgid: int) -> bool:
        if not os.path.isdir("/proc/self"):
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return False
            return True
        return bool(cls.group_pids(pgid))

    def stop(self, grace: float = 1.0) -> None:
        """SIGTERM to the master (its clients get BYE), then after ``grace`` seconds SIGKILL to
        whatever of the group is left (Dovecot's own shutdown can linger ~5 s waiting for its
        children); returns once every process of the group is gone."""
        self._signal_group(signal.SIGTERM, grace)

    def kill(self) -> None:
        """SIGKILL the group: a crash (what was delivered is on disk and survives a restart)."""
        self._signal_group(signal.SIGKILL, 10)

    def restart(self) -> None:
        """Stop and start again on the same port."""
        self.stop()
        self.start()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()
        shutil.rmtree(self.run_dir, ignore_errors=True)
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    # --- users -----------------------------------------------------------------------------

    def _protect(self, path: pathlib.Path) -> None:
        """Readable by the auth process's user only."""
        os.chmod(path, 0o600)
        if os.geteuid() == 0:
            os.chown(path, self.uid, self.gid)

    def _set_lines(self, path: pathlib.Path, keys: list[str], lines: list[str]) -> None:
        """Drop the entries of ``keys`` and add ``lines``; written whole and renamed, so a running
        Dovecot (which re-reads a changed passwd-file) never sees half a file."""
        kept = [entry for entry in path.read_text().splitlines() if entry.split(":", 1)[0] not in keys]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(f"{entry}\n" for entry in [*kept, *lines]))
        self._protect(tmp)
        os.replace(tmp, path)
        # Dovecot re-reads a passwd-file when its mtime or size changed, checking at most once a
        # second: a distinct mtime always, then let the clock pass into the next second
        stamp = max(time.time(), self._stamps.get(path, 0) + 1)
        os.utime(path, (stamp, stamp))
        self._stamps[path] = path.stat().st_mtime
        if self.alive():
            time.sleep(1.05 - (time.time() % 1.0))

    def add_user(self, address: str, password: str = "pw") -> None:
        """A user in the passwd-file with its maildir home (works while running; then takes up to
        a second, until Dovecot sees the file changed: add many at once with ``add_users``)."""
        self.add_users([address], password)

    def add_users(self, addresses: list[str] | tuple[str, ...], password: str = "pw") -> None:
        for address in addresses:
            if ":" in address or ":" in password or "\n" in address + password or "/" in address:
                raise ValueError("user names and passwords may not hold ':', '/' or newlines")
            home = self.home_dir / address
            home.mkdir(parents=True, exist_ok=True)
            if os.geteuid() == 0:
                os.chown(home, self.uid, self.gid)
        self._set_lines(self.users_file, list(addresses),
                        [f"{address}:{{PLAIN}}{password}::::::" for address in addresses])

    def refuse_login(self, address: str) -> None:
        """From now on ``address`` cannot log in, by any mechanism, itself or through the master
        user (a deny passdb); its mail stays, and the harness's own helpers still reach it."""
        keys = [address, f"{address}{self.master_user}"]
        self._set_lines(self.denied_file, keys, [f"{key}:::::::" for key in keys])

    def allow_login(self, address: str) -> None:
        self._set_lines(self.denied_file, [address, f"{address}{self.master_user}"], [])

    # --- mail, through IMAP as the master user ------------------------------------------------

    @contextmanager
    def _imap(self, address: str) -> Iterator[imaplib.IMAP4]:
        conn = imaplib.IMAP4(self.host, self.port, timeout=10)
        try:
            conn.login(f"{address}*{HARNESS_MASTER}", self.harness_password)
            yield conn
        finally:
            try:
                conn.logout()
            except (imaplib.IMAP4.error, OSError):
                pass

    @staticmethod
    def _ok(result: tuple[str, list], what: str) -> list:
        typ, data = result
        if typ != "OK":
            raise RuntimeError(f"IMAP {what} failed: {typ} {data!r}")
        return data

    def _ensure_folder(self, conn: imaplib.IMAP4, folder: str) -> None:
        if folder.upper() == "INBOX":
            return
        typ, data = conn.create(_quote(folder))
        if typ != "OK" and b"ALREADYEXISTS" not in b"".join(d for d in data if isinstance(d, bytes)):
            raise RuntimeError(f"IMAP CREATE {folder} failed: {data!r}")

    def append(self, address: str, raw: bytes, folder: str = "INBOX", flags: str = "",
               date_time: float | None = None) -> int:
        """Deliver ``raw`` to ``folder`` (made if missing); returns its UID (APPENDUID)."""
        with self._imap(address) as conn:
            self._ensure_folder(conn, folder)
            data = self._ok(conn.append(_quote(folder), flags or None,
                                        imaplib.Time2Internaldate(date_time or time.time()), raw), "APPEND")
        found = re.search(rb"APPENDUID \d+ (\d+)", data[0] or b"")
        if not found:
            raise RuntimeError(f"no APPENDUID in {data!r}")
        return int(found.group(1))

    def move(self, address: str, uid: int, src: str, dst: str) -> int:
        """UID MOVE one message (``dst`` made if missing); returns its new UID in ``dst``."""
        with self._imap(address) as conn:
            self._ensure_folder(conn, dst)
            self._ok(conn.select(_quote(src)), f"SELECT {src}")
            data = self._ok(conn.uid("MOVE", str(uid), _quote(dst)), "UID MOVE")
            codes = [*(conn.response("COPYUID")[1] or []), *data]
        for code in codes:
            found = re.search(rb"(?:COPYUID )?\d+ (\S+) (\S+)", code or b"")
            if found and found.group(1) == str(uid).encode():
                return int(found.group(2))
        raise RuntimeError(f"message {uid} not moved from {src} (no COPYUID: {codes!r})")

    def expunge(self, address: str, uid: int, folder: str = "INBOX") -> None:
        with self._imap(address) as conn:
            self._ok(conn.select(_quote(folder)), f"SELECT {folder}")
            self._ok(conn.uid("STORE", str(uid), "+FLAGS.SILENT", "(\\Deleted)"), "UID STORE")
            self._ok(conn.uid("EXPUNGE", str(uid)), "UID EXPUNGE")

    def create_folder(self, address: str, folder: str, special_use: str | None = None) -> None:
        """CREATE ``folder``; ``special_use`` (e.g. ``\\Junk``) is given to that folder name in
        the namespace's config (so for every user) and the server reloaded."""
        if special_use and self.special_folders.get(folder) != special_use:
            # Dovecot 2.3 has no CREATE-SPECIAL-USE: uses come from the namespace's mailbox
            # blocks (for every user's folder of that name), so add one and reload
            if '"' in folder or "\\" in folder:
                raise ValueError("a special-use folder name may not hold quotes or backslashes")
            self.special_folders[folder] = special_use
            self._write_config()
            if self.alive():
                self._doveadm("reload")
                time.sleep(0.3)  # the master re-reads its config and starts new login processes
        with self._imap(address) as conn:
            self._ensure_folder(conn, folder)

    def uidvalidity(self, address: str, folder: str = "INBOX") -> int:
        with self._imap(address) as conn:
            data = self._ok(conn.status(_quote(folder), "(UIDVALIDITY)"), "STATUS")
        return int(re.search(rb"UIDVALIDITY (\d+)", data[0]).group(1))  # type: ignore[union-attr]

    def _messages(self, conn: imaplib.IMAP4, folder: str) -> list[tuple[bytes, bytes, bytes]]:
        """(flags, internaldate, body) of every message in ``folder``, in UID order."""
        typ, data = conn.select(_quote(folder))
        if typ != "OK":
            raise RuntimeError(f"IMAP SELECT {folder} failed: {data!r}")
        if int(data[0] or 0) == 0:
            return []
        data = self._ok(conn.uid("FETCH", "1:*", "(FLAGS INTERNALDATE BODY.PEEK[])"), "UID FETCH")
        out: list[tuple[bytes, bytes, bytes]] = []
        for part in data:
            if isinstance(part, tuple):
                head = part[0]
                flags = re.search(rb"FLAGS \(([^)]*)\)", head)
                date = re.search(rb'INTERNALDATE "([^"]+)"', head)
                kept = b" ".join(f for f in (flags.group(1) if flags else b"").split() if f != b"\\Recent")
                out.append((kept, b'"' + (date.group(1) if date else b"") + b'"', part[1]))
        return out

    def recreate_folder(self, address: str, folder: str) -> None:
        """Delete ``folder`` and make it again with its mail re-appended (new UIDs from 1, a new
        UIDVALIDITY), as a server does when a mailbox is recreated. INBOX cannot be deleted: its
        mail is copied out, the maildir's UID list and indexes removed and the folder resynced."""
        before = self.uidvalidity(address, folder)
        with self._imap(address) as conn:
            messages = self._messages(conn, folder)
            if folder.upper() != "INBOX":
                conn.close()
                self._ok(conn.delete(_quote(folder)), f"DELETE {folder}")
                self._ok(conn.create(_quote(folder)), f"CREATE {folder}")
        if folder.upper() == "INBOX":
            maildir = self.home_dir / address / "Maildir"
            for sub in ("cur", "new", "tmp"):
                for entry in (maildir / sub).glob("*"):
                    entry.unlink()
            for entry in maildir.glob("dovecot.index*"):
                entry.unlink()
            (maildir / "dovecot-uidlist").unlink(missing_ok=True)
            self._doveadm("force-resync", "-u", address, "INBOX")
        with self._imap(address) as conn:
            for flags, date, body in messages:
                self._ok(conn.append(_quote(folder), f"({flags.decode()})" if flags else None,
                                     date.decode(), body), "APPEND")
        after = self.uidvalidity(address, folder)
        if after == before:
            raise RuntimeError(f"UIDVALIDITY of {folder} did not change ({before})")

    # --- sessions, through doveadm --------------------------------------------------------------

    def _doveadm(self, *args: str) -> str:
        done = subprocess.run([self.doveadm, "-c", str(self.config), *args], capture_output=True, text=True,
                              timeout=30, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"doveadm {args[0]} failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout

    def connections(self, address: str) -> int:
        """How many IMAP connections ``address`` has now (``doveadm who``)."""
        out = self._doveadm("who", "-1", address)
        return sum(1 for line in out.splitlines() if line.split()[:1] == [address])

    def kick(self, address: str) -> int:
        """Cut every connection of ``address`` (``doveadm kick``, e.g. mid-IDLE); returns how many."""
        count = self.connections(address)
        if count:
            self._doveadm("kick", address)
        return count
