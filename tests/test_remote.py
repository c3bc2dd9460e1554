"""The SSH device against a real OpenSSH server on 127.0.0.1, started by the test as the current user with
throwaway host and user keys: a measurement through it, a refused host key (unknown, and changed), an
unreachable port, a run timeout, and a connection dropped mid-run."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from devices import DeviceError, get_device, load_profile
from devices.remote import RemoteDevice, parse_connection
from exporters.onnx import export_onnx

SSHD = "/usr/sbin/sshd"
pytestmark = pytest.mark.skipif(
    not (Path(SSHD).is_file() and all(shutil.which(p) for p in ("ssh", "scp", "ssh-keygen"))),
    reason="needs OpenSSH (client and /usr/sbin/sshd): apt-get install -y openssh-server openssh-client")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    """Process ids under ``pid`` (from /proc), deepest last."""
    children = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


class Sshd:
    """One sshd on a free loopback port; ``kill()`` ends it and every session it forked (by pid), sshd
    first, the way a board that loses power or network takes the connection with it."""

    def __init__(self, d: Path):
        self.dir = d
        self.port = _free_port()
        d.mkdir(parents=True, exist_ok=True)
        for key in ("host_key", "user_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True)
        shutil.copy(d / "user_key.pub", d / "authorized_keys")
        user = os.environ.get("USER") or __import__("pwd").getpwuid(os.getuid()).pw_name
        (d / "sshd_config").write_text(f"""ListenAddress 127.0.0.1
HostKey {d / 'host_key'}
PidFile none
AuthorizedKeysFile {d / 'authorized_keys'}
AllowUsers {user}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
Subsystem sftp internal-sftp
""")
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
        self.log = open(d / "sshd.log", "w")
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config"), "-p", str(self.port)],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.kill()
                    pytest.skip(f"sshd did not start: {(d / 'sshd.log').read_text()[-300:]}")
                time.sleep(0.1)
        host_pub = (d / "host_key.pub").read_text().split()
        (d / "known_hosts").write_text(f"[127.0.0.1]:{self.port} {host_pub[0]} {host_pub[1]}\n")
        (d / "ssh_config").write_text("IdentitiesOnly yes\n")  # nothing from the user's ~/.ssh/config

    def profile(self, path: Path, runtime: str = "onnxruntime", precisions=("fp32",), **options) -> Path:
        opts = {"ssh_config": str(self.dir / "ssh_config"), "identity_file": str(self.dir / "user_key"),
                "known_hosts": str(self.dir / "known_hosts"), "python": sys.executable,
                "connect_timeout_s": 5, "workdir": str(self.dir), **options}
        user = os.environ.get("USER") or __import__("pwd").getpwuid(os.getuid()).pw_name
        path.write_text(yaml.safe_dump({
            "name": "loopback-board", "kind": "cpu", "runtime": runtime, "threads": 1,
            "precisions": list(precisions), "connection": f"ssh://{user}@127.0.0.1:{self.port}", "options": opts}))
        return path

    def kill(self):
        for pid in [self.proc.pid, *_descendants(self.proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=10)
        self.log.close()


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    s = Sshd(tmp_path_factory.mktemp("sshd"))
    yield s
    s.kill()


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    """The quickstart-sized student (a two-stage ResNet on 16x16 digits), exported to ONNX."""
    from compressor.models import ResNet

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "student.onnx"
    export_onnx(ResNet(widths=(4, 8), depths=(1, 1), in_channels=1), (torch.randn(1, 1, 16, 16),), path)
    return path


def _board_tmp_dirs(sshd) -> set:
    return set(sshd.dir.glob("compressor-bench.*"))


def test_parse_connection():
    assert parse_connection("ssh://pi@raspberrypi.local") == ("pi", "raspberrypi.local", None)
    assert parse_connection("ssh://pi@10.0.0.2:2222") == ("pi", "10.0.0.2", 2222)
    assert parse_connection("ssh://board") == (None, "board", None)
    for bad in ("pi@host", "ssh://", "ssh://pi@host:port", "ssh://pi@host/path"):
        with pytest.raises(DeviceError, match="ssh://user@host"):
            parse_connection(bad)


def test_measure_through_loopback_sshd(sshd, student, tmp_path):
    before = _board_tmp_dirs(sshd)
    dev = get_device(str(sshd.profile(tmp_path / "board.yaml")))
    assert isinstance(dev, RemoteDevice)
    assert dev.why_unavailable() is None and dev.available()
    m = dev.measure(student, batch=2, warmup=2, runs=10, max_seconds=5)
    assert not m.estimated and m.label == "measured" and m.runs == 10 and m.batch == 2
    assert m.device == "loopback-board" and m.threads == 1 and m.runtime == "onnxruntime"
    assert m.input_shapes == {"input": [2, 1, 16, 16]} and 0 < m.p50_ms <= m.p99_ms
    assert m.host["connection"].endswith(f"127.0.0.1:{sshd.port}") and "cpu_model" in m.host
    assert m.extra["stop"] == "runs"
    assert _board_tmp_dirs(sshd) == before, "the temporary directory on the board is removed"


def test_cli_profile_through_ssh_with_stability_stop(sshd, student, tmp_path):
    prof = sshd.profile(tmp_path / "board.yaml", target_cv=10.0)  # any spread counts as stable
    r = subprocess.run([sys.executable, "-m", "compressor.cli", "profile", str(student), "--device", str(prof),
                        "--runs", "500", "--warmup", "1", "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    (m,) = json.loads(r.stdout)
    assert m["extra"]["stop"] == "stable" and m["runs"] == m["extra"]["window"] == 20


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_unknown_host_key_is_refused(sshd, student, tmp_path):
    (tmp_path / "empty_known_hosts").write_text("")
    dev = get_device(load_profile(str(sshd.profile(tmp_path / "b.yaml", known_hosts=str(tmp_path / "empty_known_hosts")))))
    why = dev.why_unavailable()
    assert "not in known_hosts" in why and "ssh-keyscan -p" in why
    with pytest.raises(DeviceError, match="not in known_hosts") as e:
        dev.measure(student, runs=5)
    assert "known_hosts" in _one_line(e)
    assert (tmp_path / "empty_known_hosts").read_text() == "", "the key is never added silently"


def test_changed_host_key_is_refused(sshd, student, tmp_path):
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    kt, key = other.with_suffix(".pub").read_text().split()[:2]
    (tmp_path / "wrong_known_hosts").write_text(f"[127.0.0.1]:{sshd.port} {kt} {key}\n")
    dev = get_device(str(sshd.profile(tmp_path / "b.yaml", known_hosts=str(tmp_path / "wrong_known_hosts"))))
    with pytest.raises(DeviceError, match="host key .* has CHANGED") as e:
        dev.measure(student, runs=5)
    assert "ssh-keygen -R" in _one_line(e)
    assert not dev.available()


def test_refused_login_and_unreachable_port(sshd, student, tmp_path):
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    dev = get_device(str(sshd.profile(tmp_path / "b.yaml", identity_file=str(stranger))))
    with pytest.raises(DeviceError, match="refused the login .*ssh-copy-id") as e:
        dev.measure(student, runs=5)
    _one_line(e)
    prof = yaml.safe_load((tmp_path / "b.yaml").read_text())
    prof["connection"] = prof["connection"].rsplit(":", 1)[0] + f":{_free_port()}"  # nobody listens there
    (tmp_path / "closed.yaml").write_text(yaml.safe_dump(prof))
    dev = get_device(str(tmp_path / "closed.yaml"))
    assert "unreachable" in dev.why_unavailable() and "Connection refused" in dev.why_unavailable()


def test_missing_runtime_on_board_and_run_timeout(sshd, student, tmp_path):
    fake = tmp_path / "fake-python"
    fake.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'onnxruntime'\" >&2\nexit 1\n")
    fake.chmod(0o755)
    dev = get_device(str(sshd.profile(tmp_path / "a.yaml", python=str(fake))))
    assert "cannot import onnxruntime" in dev.why_unavailable()
    with pytest.raises(DeviceError, match="benchmark on remote board .* failed: ModuleNotFoundError"):
        dev.measure(student, runs=5)
    slow = tmp_path / "slow-python"
    slow.write_text("#!/bin/sh\nsleep 4\n")
    slow.chmod(0o755)
    dev = get_device(str(sshd.profile(tmp_path / "b.yaml", python=str(slow), run_timeout_s=1)))
    with pytest.raises(DeviceError, match="did not finish measuring within 1 s"):
        dev.measure(student, runs=5)


def test_connection_dropped_mid_run(student, tmp_path):
    """The board goes away while the benchmark runs: its sshd and sessions are killed."""
    board = Sshd(tmp_path / "sshd")
    try:
        started = tmp_path / "started"
        hang = tmp_path / "hanging-python"
        hang.write_text(f"#!/bin/sh\ntouch {started}\nexec sleep 30\n")
        hang.chmod(0o755)
        dev = get_device(str(board.profile(tmp_path / "b.yaml", python=str(hang))))
        result = {}

        def run():
            try:
                result["m"] = dev.measure(student, runs=5)
            except DeviceError as e:
                result["e"] = e

        t = threading.Thread(target=run)
        t.start()
        deadline = time.time() + 30
        while not started.exists() and time.time() < deadline:
            time.sleep(0.05)
        assert started.exists(), "the benchmark never started on the board"
    finally:
        board.kill()
    t.join(timeout=40)
    assert not t.is_alive()
    msg = str(result["e"])
    assert "dropped while measuring" in msg and "\n" not in msg, msg
