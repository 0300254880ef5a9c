"""The SSH transport: the system's ssh and scp (so ~/.ssh/config aliases, keys and agents work as they do for
`ssh`), in batch mode (no prompts), host keys checked strictly, every failure one line."""

from __future__ import annotations

import re
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import DeployError

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")  # a user or host name that no tool reads as an option
REMOTE_DIR = re.compile(r"/[A-Za-z0-9._/-]+")  # what mktemp -d gives; the copy's target must be one

# ssh's own messages (exit 255; scp exits 1 with them), in the order they are told apart
_FAULTS = [
    ("REMOTE HOST IDENTIFICATION HAS CHANGED", ("host key mismatch: {host}'s key differs from the one in known_hosts "
     "(refusing to connect; if the device was reinstalled, remove the old key with `ssh-keygen -R '{known}'`)")),
    ("Host key verification failed", ("host key of {host} is not known: connect once with `ssh` to check and store "
     "it, or pass --accept-new-host-key")),
    ("Permission denied", "authentication refused by {host} ({line})"),
    ("Too many authentication failures", "authentication refused by {host} ({line})"),
    ("Could not resolve hostname", "cannot reach {host} ({line})"),
    ("Connection refused", "cannot reach {host} ({line})"),
    ("No route to host", "cannot reach {host} ({line})"),
    ("Network is unreachable", "cannot reach {host} ({line})"),
    ("Connection timed out", "cannot reach {host} ({line})"),
    ("closed by remote host", "connection to {host} dropped ({line})"),
    ("Connection closed", "connection to {host} dropped ({line})"),
    ("Connection reset", "connection to {host} dropped ({line})"),
    ("Broken pipe", "connection to {host} dropped ({line})"),
    ("not responding", "connection to {host} dropped ({line})"),
]  # fmt: skip


@dataclass(frozen=True)
class Device:
    """An `ssh://[user@]host[:port]` URL; host may be a ~/.ssh/config alias."""

    url: str
    user: str | None
    host: str
    port: int | None

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host


def parse(url: str) -> Device:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as err:
        raise DeployError(f"{url}: {err}") from None
    host, user = parts.hostname, parts.username
    if (
        parts.scheme != "ssh"
        or not host
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or parts.password
    ):
        raise DeployError(f"{url}: expected ssh://[user@]host[:port]")
    if not (_NAME.fullmatch(host) or re.fullmatch(r"[0-9A-Fa-f:.]+", host)) or (user and not _NAME.fullmatch(user)):
        raise DeployError(f"{url}: unsupported characters in the user or host name")
    return Device(url, user, host, port)


class Ssh:
    """Commands and copies to one device within `timeout` seconds in all. `config`: an ssh_config file used
    instead of ~/.ssh/config (-F)."""

    def __init__(self, device: Device, timeout: float, config: Path | None = None, accept_new_host_key: bool = False,
                 connect_timeout: int = 10):  # fmt: skip
        self.device, self.timeout = device, timeout
        self.deadline = time.monotonic() + timeout
        self.options = [*(["-F", str(config)] if config else []),
                        "-o", "BatchMode=yes",
                        "-o", f"StrictHostKeyChecking={'accept-new' if accept_new_host_key else 'yes'}",
                        "-o", f"ConnectTimeout={connect_timeout}",
                        "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3"]  # fmt: skip

    def left(self) -> float:
        """Seconds left before the deadline."""
        return self.deadline - time.monotonic()

    def run(self, script: str, timeout: float | None = None) -> subprocess.CompletedProcess:
        """Run a POSIX sh script on the device (its values quoted by the caller; the login shell may be another),
        within `timeout` seconds (default: what is left before the deadline). Transport failures and the timeout
        raise DeployError; the script's own exit status is the caller's to judge."""
        port = ["-p", str(self.device.port)] if self.device.port else []
        argv = ["ssh", *self.options, *port, "--", self.device.destination, f"sh -c {shlex.quote(script)}"]
        done = self._call(argv, self.left() if timeout is None else timeout)
        if done.returncode == 255:
            raise DeployError(self.fault(done.stderr))
        return done

    def copy(self, files: list[Path], remote_dir: str, timeout: float | None = None) -> None:
        """Copy local files into an existing folder on the device (within `timeout`, default what is left)."""
        if not REMOTE_DIR.fullmatch(remote_dir):
            raise DeployError(f"{self.device.url}: unexpected remote folder name {remote_dir!r}")
        port = ["-P", str(self.device.port)] if self.device.port else []
        host = f"[{self.device.host}]" if ":" in self.device.host else self.device.host
        target = f"{self.device.user}@{host}" if self.device.user else host
        done = self._call(
            ["scp", "-q", *self.options, *port, "--", *map(str, files), f"{target}:{remote_dir}/"],
            self.left() if timeout is None else timeout,
        )
        if done.returncode != 0:
            raise DeployError(self.fault(done.stderr))

    def fault(self, stderr: str) -> str:
        """One line for an ssh/scp failure, from ssh's messages."""
        lines = [x.strip("@ ") for x in stderr.splitlines() if x.strip("@ ")]
        d = self.device
        for needle, message in _FAULTS:
            line = next((x for x in lines if needle in x), None)
            if line is not None:
                known = f"[{d.host}]:{d.port}" if d.port else d.host  # its name in known_hosts
                return f"{d.url}: " + message.format(host=d.host, known=known, line=line.rstrip("."))
        return f"{self.device.url}: ssh failed ({lines[-1] if lines else 'no message'})"

    def _call(self, argv: list[str], timeout: float) -> subprocess.CompletedProcess:
        try:
            if timeout <= 0:
                raise subprocess.TimeoutExpired(argv, timeout)
            return subprocess.run(
                argv, check=False, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
            )
        except subprocess.TimeoutExpired:
            raise DeployError(f"{self.device.url}: timed out after {self.timeout:g} s (--timeout)") from None
        except FileNotFoundError:
            raise DeployError(f"`{argv[0]}` not found: install the OpenSSH client (openssh-client)") from None
