"""A board reached over SSH: copy the model and the runtime's standalone benchmark script to a temporary
directory on it, run the script with the board's Python, read back its JSON, clean up.

The system ``ssh``/``scp`` binaries do the work, so the user's ~/.ssh/config, keys and agent apply as
they do on the command line. Host keys are always checked (StrictHostKeyChecking=yes is given on the
command line, where no config file can override it): an unknown or changed key is a DeviceError that
says how to add the key after checking it, never a silent trust. BatchMode keeps ssh from waiting for a
password nobody will type.

Profile options (all optional):
    ssh_config: path     an ssh_config file instead of ~/.ssh/config (``-F``)
    identity_file: path  a private key (``-i``)
    known_hosts: path    a known_hosts file (UserKnownHostsFile)
    python: python3      the board's Python (needs the runtime and numpy)
    workdir: $TMPDIR     where the per-measurement temporary directory goes on the board (default /tmp)
    connect_timeout_s: 10, run_timeout_s: (max_seconds + 120; TensorRT: + 600 for the engine build)
    target_cv: 0         passed to the script: stop once the spread is stable
    device: CPU          openvino: the OpenVINO device on the board (CPU, GPU, NPU)
    trtexec: path        tensorrt: the board's trtexec (default: on PATH, then /usr/src/tensorrt/bin/trtexec)
    warmup_ms: 500       tensorrt: trtexec --warmUp
"""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from .measurement import Measurement
from .profile import DeviceError, DeviceProfile

# runtime -> the standalone script in devices/ that measures it (needs only that runtime on the board);
# it goes to the board as bench.py, with HELPERS beside it under their own names
SCRIPTS = {"onnxruntime": "bench_onnxruntime.py", "openvino": "bench_openvino.py", "tensorrt": "bench_trtexec.py"}
# the shared timing loop, statistics and host description (imports onnxruntime only to measure with it)
HELPERS = {"openvino": ["bench_onnxruntime.py"], "tensorrt": ["bench_onnxruntime.py"]}
# what the script needs on the board, checked by available() with the board's Python (argv[1]: the
# profile's options.trtexec, or "")
IMPORTS = {
    "onnxruntime": "import numpy, onnxruntime; print(onnxruntime.__version__)",
    "openvino": "import numpy, openvino; print(openvino.get_version())",
    "tensorrt": ("import numpy, shutil, sys\n"
                 "c = [sys.argv[1]] if sys.argv[1:] and sys.argv[1] else ['trtexec', '/usr/src/tensorrt/bin/trtexec']\n"
                 "p = next((shutil.which(x) for x in c if shutil.which(x)), None)\n"
                 "print(p) if p else sys.exit('trtexec not found on the board (looked for ' + ', '.join(c) + '): "
                 "install TensorRT (JetPack ships /usr/src/tensorrt/bin/trtexec) or set options.trtexec in the profile')"),
}
NOISY_CV = 0.5
TRT_BUILD_S = 600  # a run on a TensorRT board builds the engine first: minutes on a Jetson


def parse_connection(connection: str) -> tuple[str | None, str, int | None]:
    """``ssh://user@host[:port]`` -> (user, host, port); user and port may be left to ssh_config."""
    u = urlsplit(connection)
    if u.scheme != "ssh" or not u.hostname or u.path not in ("", "/"):
        raise DeviceError(f"connection {connection!r}: expected ssh://user@host[:port]")
    try:
        port = u.port
    except ValueError:
        raise DeviceError(f"connection {connection!r}: the port is not a number from 1 to 65535 (expected ssh://user@host[:port])") from None
    return u.username, u.hostname, port


class RemoteDevice:
    """Measures on a board over SSH with the runtime's standalone script; measurements, never estimates."""

    def __init__(self, profile: DeviceProfile):
        self.profile = profile
        if profile.runtime not in SCRIPTS:
            raise DeviceError(f"device {profile.name}: no standalone benchmark script for runtime "
                              f"{profile.runtime!r} to run over SSH (have: {', '.join(SCRIPTS)})")
        self.user, self.host, self.port = parse_connection(profile.connection)
        self.script = Path(__file__).resolve().parent / SCRIPTS[profile.runtime]
        opts = profile.options
        self.python = str(opts.get("python", "python3"))
        self.connect_timeout = float(opts.get("connect_timeout_s", 10))
        self.run_timeout = opts.get("run_timeout_s")

    # ------------------------------------------------------------------------------ ssh plumbing

    @property
    def where(self) -> str:
        return f"{self.user + '@' if self.user else ''}{self.host}{f':{self.port}' if self.port else ''}"

    @property
    def _target(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host

    def _options(self) -> list[str]:
        opts = self.profile.options
        args = []
        if opts.get("ssh_config"):
            args += ["-F", str(Path(opts["ssh_config"]).expanduser())]
        if opts.get("identity_file"):
            args += ["-i", str(Path(opts["identity_file"]).expanduser())]
        if opts.get("known_hosts"):
            args += ["-o", f"UserKnownHostsFile={Path(opts['known_hosts']).expanduser()}"]
        # Command-line options win over every config file: these cannot be weakened by ~/.ssh/config.
        args += ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                 "-o", f"ConnectTimeout={max(1, round(self.connect_timeout))}",
                 # a board that vanishes without closing the connection is noticed in ~15 s
                 "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3"]
        return args

    def _ssh(self, command: str, timeout: float, what: str) -> subprocess.CompletedProcess:
        port = ["-p", str(self.port)] if self.port else []
        return self._call(["ssh", *self._options(), *port, self._target, command], timeout, what)

    def _scp(self, files: list[Path], remote_dir: str, timeout: float) -> None:
        port = ["-P", str(self.port)] if self.port else []
        r = self._call(["scp", "-q", *self._options(), *port, *map(str, files), f"{self._target}:{remote_dir}/"],
                       timeout, "copying the model")
        if r.returncode != 0:
            raise self._error(r, "copying the model")

    def _call(self, argv: list[str], timeout: float, what: str) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            raise DeviceError(f"device {self.profile.name}: the `{argv[0]}` program is not installed here "
                              "(install the OpenSSH client)") from None
        except subprocess.TimeoutExpired:
            raise DeviceError(f"device {self.profile.name}: remote board {self.where} did not finish "
                              f"{what} within {timeout:.0f} s (raise options.run_timeout_s, or check the board)"
                              ) from None

    def _error(self, r: subprocess.CompletedProcess, what: str) -> DeviceError:
        """One clear line for a failed ssh/scp call: host key, authentication, reachability, a drop."""
        err = r.stderr or ""
        lines = [ln.strip() for ln in err.splitlines() if ln.strip() and not ln.startswith(("@", "Warning:"))]
        last = lines[-1] if lines else f"exit status {r.returncode}"
        name, where = self.profile.name, self.where
        hostspec = f"[{self.host}]:{self.port}" if self.port and self.port != 22 else self.host
        scan = f"ssh-keyscan {'-p ' + str(self.port) + ' ' if self.port else ''}{self.host}"
        if "REMOTE HOST IDENTIFICATION HAS CHANGED" in err or "Host key for" in err and "has changed" in err:
            return DeviceError(
                f"device {name}: the host key of remote board {where} has CHANGED since it was recorded "
                f"(a reinstalled board, or someone in between); if the change is expected, remove the old "
                f"key with `ssh-keygen -R '{hostspec}'` and add the new one after checking its fingerprint")
        if "Host key verification failed" in err or "No ED25519 host key is known" in err \
                or re.search(r"No \S+ host key is known", err):
            return DeviceError(
                f"device {name}: the host key of remote board {where} is not in known_hosts (or does not "
                f"match it), so it is not trusted; check its fingerprint on the board (`ssh-keygen -lf "
                f"/etc/ssh/ssh_host_ed25519_key.pub`) and add it: `{scan} >> ~/.ssh/known_hosts`, or connect "
                f"once by hand with `ssh {'-p ' + str(self.port) + ' ' if self.port else ''}{self._target}`")
        if "Permission denied" in err or "Too many authentication failures" in err:
            return DeviceError(
                f"device {name}: remote board {where} refused the login ({last}); install a key on it "
                f"(`ssh-copy-id {self._target}`) or name one in the profile's options.identity_file")
        if re.search(r"Connection refused|timed out|No route to host|Could not resolve|Network is unreachable"
                     r"|Name or service not known", err) and "closed" not in err:
            return DeviceError(f"device {name}: remote board {where} is unreachable while {what} ({last})")
        if r.returncode == 255 or re.search(r"closed by|Connection reset|Broken pipe|lost connection"
                                            r"|not responding|killed by signal", err):
            return DeviceError(f"device {name}: the connection to remote board {where} dropped while {what} "
                               f"({last}); measurements taken before it are kept, rerun when the board is back")
        return DeviceError(f"device {name}: {what} on remote board {where} failed: {last}")

    # ------------------------------------------------------------------------------ Device protocol

    def available(self) -> bool:
        return self.why_unavailable() is None

    def why_unavailable(self) -> str | None:
        """Reachable, host key known, login works, and the board's Python imports the runtime."""
        cmd = f"{shlex.quote(self.python)} -c {shlex.quote(IMPORTS[self.profile.runtime])}"
        if self.profile.runtime == "tensorrt":
            cmd += f" {shlex.quote(str(self.profile.options.get('trtexec') or ''))}"
        try:
            r = self._ssh(cmd, self.connect_timeout + 20, "checking it")
        except DeviceError as e:
            return str(e).split(": ", 1)[-1]
        if r.returncode == 0:
            return None
        if r.returncode == 255:
            return str(self._error(r, "connecting")).split(": ", 1)[-1]
        last = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
        if last.startswith("trtexec not found"):
            return f"remote board {self.where}: {last}"
        what = "numpy" if self.profile.runtime == "tensorrt" else f"{self.profile.runtime} and numpy"
        return (f"remote board {self.where}: `{self.python}` cannot import {what} ({last}); install "
                f"{'it' if what == 'numpy' else 'them'} on the board")

    def measure(self, model: str | Path, *, batch: int = 1, warmup: int = 10, runs: int = 100,
                max_seconds: float = 30.0, precision: str = "fp32", dims: dict | None = None) -> Measurement:
        model = Path(model)
        if not model.is_file():
            raise DeviceError(f"{model} does not exist")
        if precision not in self.profile.precisions:
            raise DeviceError(f"device {self.profile.name} does not list precision {precision!r} "
                              f"(it lists {', '.join(self.profile.precisions)})")
        runtime = self.profile.runtime
        files = [model, *_companions(model)]
        timeout = float(self.run_timeout or max_seconds + 120 + (TRT_BUILD_S if runtime == "tensorrt" else 0))
        # One temporary directory per measurement, made by the board's mktemp; removed by the run itself
        # (trap on exit and hang-up) and once more from here if the run failed.
        parent = self.profile.options.get("workdir")
        parent = shlex.quote(str(parent)) if parent else '"${TMPDIR:-/tmp}"'
        r = self._ssh(f"mktemp -d {parent}/compressor-bench.XXXXXX", self.connect_timeout + 20,
                      "making a temporary directory")
        if r.returncode != 0 or not r.stdout.strip().startswith("/"):
            raise self._error(r, "making a temporary directory")
        rdir = r.stdout.strip().splitlines()[-1]
        ok = False
        try:
            with tempfile.TemporaryDirectory(prefix="compressor-remote-") as tmp:
                bench = Path(tmp) / "bench.py"
                bench.write_bytes(self.script.read_bytes())
                helpers = [self.script.parent / h for h in HELPERS.get(runtime, [])]
                self._scp([bench, *helpers, *files], rdir, timeout)
            args = [self.python, "bench.py", model.name, "--batch", str(batch), "--threads",
                    str(self.profile.threads), "--warmup", str(warmup), "--runs", str(runs),
                    "--max-seconds", str(max_seconds), *self._runtime_args(model, batch, precision, dims, timeout)]
            target_cv = float(self.profile.options.get("target_cv", 0) or 0)
            if target_cv > 0:
                args += ["--target-cv", str(target_cv)]
            q = shlex.quote(rdir)
            cmd = f"trap 'rm -rf {q}' EXIT HUP INT TERM; cd {q} && {shlex.join(args)}"
            r = self._ssh(cmd, timeout, "measuring")
            if r.returncode != 0:
                if r.returncode == 255 or not r.stderr.strip() or "signal" in r.stderr:
                    raise self._error(r, "measuring")
                last = r.stderr.strip().splitlines()[-1]
                if r.returncode > 128:  # the shell reports a benchmark killed by a signal as 128 + N
                    raise DeviceError(f"device {self.profile.name}: the benchmark on remote board {self.where} "
                                      f"was killed by signal {r.returncode - 128} (out of memory?): {last[:200]}")
                raise DeviceError(f"device {self.profile.name}: the benchmark on remote board {self.where} "
                                  f"failed: {last}")
            try:
                data = json.loads(r.stdout)
            except json.JSONDecodeError:
                raise DeviceError(f"device {self.profile.name}: remote board {self.where} answered with "
                                  f"something that is not the benchmark's JSON: {r.stdout[:200]!r}") from None
            ok = True
        finally:
            if not ok:
                try:  # best effort: the board may be gone
                    self._ssh(f"rm -rf {shlex.quote(rdir)}", min(self.connect_timeout, 5) + 5, "cleaning up")
                except DeviceError:
                    pass
        known = set(Measurement.__dataclass_fields__)
        m = Measurement(device=self.profile.name, precision=precision, artifact=model.name,
                        **{k: v for k, v in data.items() if k in known and k not in ("device", "precision")})
        m.host = {**m.host, "connection": f"ssh://{self.where}"}
        if m.cv > NOISY_CV:
            m.notes.append(f"wide spread: coefficient of variation {m.cv:.2f}")
        return m


    def _runtime_args(self, model: Path, batch: int, precision: str, dims: dict | None, timeout: float) -> list[str]:
        """The script's shape and runtime arguments. ONNX Runtime takes named axes (``--dim``); OpenVINO and
        trtexec see no axis names, so they get each input's full shape (``--shape``): given as such
        (the profile stage's OpenVINO dims), or resolved here from the ONNX file's named axes."""
        runtime, opts, dims = self.profile.runtime, self.profile.options, dict(dims or {})
        full = {k: v for k, v in dims.items() if isinstance(v, (list, tuple))}
        named = {k: v for k, v in dims.items() if k not in full}
        args = []
        if runtime == "onnxruntime":
            return [a for k, v in named.items() for a in ("--dim", f"{k}={v}")]
        if model.suffix == ".onnx":
            full = {**onnx_shapes(model, batch, named, dynamic_only=runtime == "tensorrt"), **full}
            named = {}
        args += [a for k, v in full.items() for a in ("--shape", f"{k}={','.join(str(int(d)) for d in v)}")]
        args += [a for k, v in named.items() for a in ("--dim", f"{k}={v}")]
        args += ["--precision", precision]
        if runtime == "openvino":
            args += ["--device", str(opts.get("device", "CPU"))]
        elif runtime == "tensorrt":
            args += ["--warmup-ms", str(int(opts.get("warmup_ms", 500))), "--timeout", str(max(1.0, timeout - 5))]
            if opts.get("trtexec"):
                args += ["--trtexec", str(opts["trtexec"])]
        return args


def onnx_shapes(model: Path, batch: int, dims: dict, dynamic_only: bool = False) -> dict:
    """{input: full shape} of an ONNX file at ``batch`` with named axes sized by ``dims`` (read here, where
    onnx is installed; the board may have only its runtime). ``dynamic_only``: only inputs that have a
    dynamic axis (trtexec refuses shapes for static ones). {} when onnx cannot read the file: the
    script on the board then says what is missing."""
    try:
        import onnx

        m = onnx.load(str(model), load_external_data=False)
    except Exception:
        return {}
    inits = {t.name for t in m.graph.initializer}
    out = {}
    for v in m.graph.input:
        if v.name in inits:
            continue
        shape, dynamic = [], False
        for k, d in enumerate(v.type.tensor_type.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                shape.append(int(d.dim_value))
                continue
            dynamic = True
            if d.dim_param and d.dim_param in dims:
                shape.append(int(dims[d.dim_param]))
            elif k == 0:
                shape.append(int(batch))
            elif len(dims) == 1:  # one size given, one unnamed axis besides the batch: that one
                shape.append(int(next(iter(dims.values()))))
            else:
                raise DeviceError(f"{model.name}: input {v.name!r} axis {k} ({d.dim_param or '?'}) has no size: "
                                  f"give it in dims ({d.dim_param or 'name'}=N)")
        if dynamic or not dynamic_only:
            out[v.name] = shape
    return out


def _companions(model: Path) -> list[Path]:
    """Files a model needs beside it on the board: an IR's .bin, an ONNX file's external data."""
    if model.suffix == ".xml":
        weights = model.with_suffix(".bin")
        if not weights.is_file():
            raise DeviceError(f"{model.name}: the OpenVINO IR's weights {weights.name} are not beside it")
        return [weights]
    return _external_data(model)


def _external_data(model: Path) -> list[Path]:
    """Files an ONNX model keeps its weights in beside itself (external data), when onnx can tell."""
    try:
        import onnx
        from onnx.external_data_helper import _get_all_tensors, uses_external_data
    except ImportError:
        side = model.with_name(model.name + ".data")
        return [side] if side.is_file() else []
    try:
        m = onnx.load(str(model), load_external_data=False)
    except Exception:  # not ONNX: the script on the board says so
        return []
    names = set()
    for t in _get_all_tensors(m):
        if uses_external_data(t):
            for e in t.external_data:
                if e.key == "location":
                    names.add(e.value)
    files = []
    for n in sorted(names):
        p = model.parent / n
        if p.parent != model.parent or not p.is_file():
            raise DeviceError(f"{model.name}: external data {n!r} is not a file beside the model")
        files.append(p)
    return files
