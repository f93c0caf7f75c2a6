"""Postfix for the benchmark: installing the Debian package (for ``smtp-sink``), and a
throwaway Postfix instance used as a store-and-forward relay in front of the same sink.

With ``submission`` it also listens as a real submission server, like the relay: a second
port with STARTTLS (the relay's own certificate and key type) and SMTP AUTH through Cyrus
SASL with a sasldb (Debian's ``sasl2-bin`` and ``libsasl2-modules``), relaying only for
authenticated clients. So every relay row has a Postfix row of the same shape.

The package is installed without configuring a system MTA (debconf "No configuration") and
with service start-up blocked while it installs; a system Postfix that the installation
started anyway is stopped again. The throwaway instance lives entirely in the run's work
folder (``postfix -c DIR``): it listens on 127.0.0.1 only, relays everything to
``[127.0.0.1]:<sink port>`` (an IP literal: no DNS), delivers nothing locally, and is stopped
when the run ends.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from bench.procs import HOST, BenchError, free_port, wait_for_port

_POLICY_RC = Path("/usr/sbin/policy-rc.d")


def _system_postfix_running() -> bool:
    postfix = shutil.which("postfix")
    if not postfix or not Path("/etc/postfix/main.cf").exists():
        return False
    done = subprocess.run([postfix, "status"], capture_output=True, check=False, timeout=30)
    return done.returncode == 0


def ensure_installed(log: Path) -> str:
    """Install Debian's ``postfix`` when ``smtp-sink`` is missing. Returns a note for the
    results ("" when nothing was done); raises BenchError when it cannot be installed."""
    if shutil.which("smtp-sink") and shutil.which("saslpasswd2"):
        return ""
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        raise BenchError("smtp-sink is missing and cannot be installed here "
                         "(needs root and apt-get: apt-get install postfix)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["debconf-set-selections"], input=b"postfix postfix/main_mailer_type "
                   b"select No configuration\n", env=env, check=False, timeout=60,
                   capture_output=True)
    was_running = _system_postfix_running()
    made_policy = False
    if not _POLICY_RC.exists():
        # Exit status 101 tells invoke-rc.d not to start services during the installation.
        _POLICY_RC.write_text("#!/bin/sh\n# written by bench/postfix.py, removed after\nexit 101\n")
        _POLICY_RC.chmod(0o755)
        made_policy = True
    try:
        with log.open("ab") as out:
            argv = [apt, "install", "-y", "--no-install-recommends", "postfix", "sasl2-bin",
                    "libsasl2-modules"]
            done = subprocess.run(argv, env=env, stdout=out, stderr=out, check=False,
                                  timeout=900)
            if done.returncode != 0:
                subprocess.run([apt, "update"], env=env, stdout=out, stderr=out, check=False,
                               timeout=900)
                done = subprocess.run(argv, env=env, stdout=out, stderr=out, check=False,
                                      timeout=900)
    finally:
        if made_policy:
            _POLICY_RC.unlink(missing_ok=True)
    if not was_running and _system_postfix_running():
        # Installation started a system MTA after all: stop what it started.
        subprocess.run(["postfix", "stop"], capture_output=True, check=False, timeout=60)
    if done.returncode != 0 or not shutil.which("smtp-sink"):
        raise BenchError(f"apt-get install postfix failed (see {log})")
    return ("installed Debian's postfix and Cyrus SASL packages for smtp-sink and the "
            "submission anchor (no system MTA configured)")


_MASTER_CF = """\
# service type private unpriv chroot wakeup maxproc command
{listen} inet n - n - - smtpd
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
tlsmgr    unix  - - n 1000? 1 tlsmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
proxywrite unix - - n - 1 proxymap
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
local     unix  - n n - - local
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""

# The submission listener: what the relay does on its port (STARTTLS offered, AUTH required
# to relay), as -o overrides of the plain listener's settings.
_SUBMISSION = """\
{listen} inet n - n - - smtpd
  -o smtpd_tls_security_level=may
  -o smtpd_tls_cert_file={cert}
  -o smtpd_tls_key_file={key}
  -o smtpd_tls_auth_only=no
  -o smtpd_sasl_auth_enable=yes
  -o smtpd_sasl_type=cyrus
  -o smtpd_sasl_path=smtpd
  -o smtpd_sasl_local_domain=bench.invalid
  -o smtpd_relay_restrictions=permit_sasl_authenticated,reject
  -o smtpd_recipient_restrictions=permit_sasl_authenticated,reject
"""

# Cyrus SASL's configuration for Postfix's smtpd: passwords in a sasldb of the run's own.
_SASL_CONF = """\
pwcheck_method: auxprop
auxprop_plugin: sasldb
mech_list: PLAIN LOGIN
sasldb_path: {sasldb}
"""


@dataclass(frozen=True, slots=True)
class Submission:
    cert: Path
    key: Path
    user: str
    password: str


_MAIN_CF = """\
# A throwaway instance for the benchmark (bench/postfix.py): loopback only, relays
# everything to the sink, no local delivery, no DNS.
compatibility_level = 3.6
queue_directory = {root}/spool
data_directory = {root}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.bench.invalid
mydomain = bench.invalid
myorigin = $myhostname
mydestination =
local_recipient_maps =
local_transport = error:local delivery is disabled
alias_maps =
alias_database =
relay_domains =
relayhost = [{host}]:{sink_port}
inet_interfaces = {host}
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_peername_lookup = no
smtp_dns_support_level = disabled
smtp_host_lookup = native
smtpd_tls_security_level = none
smtp_tls_security_level = none
message_size_limit = 52428800
maillog_file = {root}/maillog
maillog_file_prefixes = {root}
biff = no
"""


class ThrowawayPostfix:
    """``postfix -c <root>/etc start`` on 127.0.0.1:<port>; ``stop()`` is idempotent."""

    def __init__(self, root: Path, sink_port: int,
                 submission: Submission | None = None) -> None:
        postfix = shutil.which("postfix")
        if postfix is None:
            raise BenchError("postfix is not installed")
        if os.geteuid() != 0:
            raise BenchError("starting Postfix needs root")
        try:
            subprocess.run(["id", "postfix"], capture_output=True, check=True, timeout=10)
        except subprocess.CalledProcessError:
            raise BenchError("the postfix user does not exist") from None
        self.postfix = postfix
        self.root = root
        self.port = free_port()
        self.config = root / "etc"
        self.started = False
        for sub in ("etc", "spool", "data"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        root.chmod(0o755)
        # The run's work folder (mkdtemp: 0700) must be traversable by the postfix user.
        root.parent.chmod(root.parent.stat().st_mode | 0o011)
        shutil.chown(root / "data", "postfix")
        (self.config / "main.cf").write_text(
            _MAIN_CF.format(root=root, host=HOST, sink_port=sink_port))
        master = _MASTER_CF.format(listen=f"{HOST}:{self.port}")
        self.submission_port: int | None = None
        if submission is not None:
            self.submission_port = free_port()
            master += _SUBMISSION.format(listen=f"{HOST}:{self.submission_port}",
                                         cert=submission.cert, key=submission.key)
            self._write_sasl(root, submission)
        (self.config / "master.cf").write_text(master)

    def _write_sasl(self, root: Path, submission: Submission) -> None:
        """The sasldb with the benchmark's login, and the smtpd.conf that points to it, in
        ``<config>/sasl/`` (where Debian's Postfix has Cyrus look: it ignores a
        ``cyrus_sasl_config_path`` set in main.cf), readable by the postfix user only."""
        saslpasswd2 = shutil.which("saslpasswd2")
        if saslpasswd2 is None:
            raise BenchError("saslpasswd2 is missing (apt-get install sasl2-bin)")
        sasl = self.config / "sasl"
        sasl.mkdir(exist_ok=True)
        sasldb = sasl / "sasldb2"
        done = subprocess.run([saslpasswd2, "-c", "-p", "-f", str(sasldb), "-u",
                               "bench.invalid", submission.user],
                              input=submission.password.encode(), capture_output=True,
                              check=False, timeout=30)
        if done.returncode != 0:
            raise BenchError("saslpasswd2 failed: " + done.stderr.decode(errors="replace"))
        (sasl / "smtpd.conf").write_text(_SASL_CONF.format(sasldb=sasldb))
        for path in (sasl, sasldb, sasl / "smtpd.conf"):
            shutil.chown(path, "postfix")
        sasldb.chmod(0o600)

    def _postfix(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([self.postfix, "-c", str(self.config), *args],
                              capture_output=True, check=False, timeout=timeout)

    def start(self) -> None:
        self.started = True  # from here on stop() must run, whatever start did
        done = self._postfix("start")
        if done.returncode != 0:
            # postfix(1) reports to its log, not to a pipe.
            raise BenchError("postfix start failed: "
                             + (done.stderr or done.stdout).decode(errors="replace").strip()
                             + self.maillog_tail(5))
        wait_for_port(self.port, 30, what="postfix smtpd")

    def queue_empty(self) -> bool:
        spool = self.root / "spool"
        for sub in ("incoming", "active", "deferred", "maildrop", "hold"):
            folder = spool / sub
            if folder.exists() and any(p.is_file() for p in folder.rglob("*")):
                return False
        return True

    def master_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int((self.root / "spool" / "pid" / "master.pid").read_text().strip())
        return None

    def stop(self) -> None:
        if not self.started:
            return
        self.started = False
        pid = self.master_pid()
        self._postfix("stop")
        deadline = time.monotonic() + 15
        while pid is not None and _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid is not None and _alive(pid):
            self._postfix("abort")
            time.sleep(1)
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)

    def maillog_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join((self.root / "maillog").read_text().splitlines()[-lines:])
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
