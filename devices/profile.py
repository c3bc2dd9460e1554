"""Device profiles: frozen target descriptions read from YAML (profiles/devices/*.yaml or a user's file)."""
from __future__ import annotations

from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class DeviceError(Exception):
    """A user-facing device problem (unknown profile, unreachable board, unsupported runtime)."""


@contextmanager
def script_errors(device: str):
    """A bench script's one-line errors (its SystemExit: an unreadable model, a symbolic dimension, a model that
    fails on the synthetic inputs) as this device's DeviceError, which the profile stage records and goes on."""
    try:
        yield
    except SystemExit as e:
        raise DeviceError(f"device {device}: {e}") from None


class DeviceProfile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    kind: Literal["cpu", "gpu", "npu"]
    runtime: str = Field(description="which Device measures it: onnxruntime, openvino, tensorrt, vela, ...")
    description: str = ""
    precisions: tuple[str, ...] = ("fp32",)
    threads: int = Field(0, ge=0, description="intra-op threads; 0 lets the runtime choose")
    peak_gflops: float | None = Field(None, gt=0, description="peak compute, for estimates and rooflines")
    memory_bandwidth_gbs: float | None = Field(None, gt=0)
    source: str = Field("", description="where the peak figures come from")
    connection: str = Field("local", description="'local' or ssh://user@host[:port]")
    options: dict = Field(default_factory=dict, description="runtime-specific settings")

    @property
    def local(self) -> bool:
        return self.connection == "local"


def check_ready(device, precision: str, hint: str = "") -> None:
    """Raise a DeviceError unless ``device`` can measure now and its profile lists ``precision``."""
    why = device.why_unavailable()
    if why:
        raise DeviceError(f"device {device.profile.name} is not available: {why}")
    if precision not in device.profile.precisions:
        raise DeviceError(f"device {device.profile.name} does not list precision {precision!r} "
                          f"(it lists {', '.join(device.profile.precisions)}){hint}")


def _builtin_dir():
    return resources.files("profiles") / "devices"


def builtin_profiles() -> list[str]:
    return sorted(p.name[:-5] for p in _builtin_dir().iterdir() if p.name.endswith(".yaml"))


def load_profile(name_or_path: str) -> DeviceProfile:
    """A profile by built-in name (``local-cpu``) or by path to a YAML file."""
    path = Path(name_or_path)
    if name_or_path.endswith((".yaml", ".yml")):
        if not path.is_file():
            raise DeviceError(f"device profile file {name_or_path} does not exist")
        text = path.read_text()
    else:
        res = _builtin_dir() / f"{name_or_path}.yaml"
        if not res.is_file():
            known = ", ".join(builtin_profiles())
            raise DeviceError(f"unknown device {name_or_path!r}; known devices: {known} "
                              "(or give a path to a profile .yaml)")
        text = res.read_text()
    try:
        data = yaml.safe_load(text)
        return DeviceProfile.model_validate(data)
    except (yaml.YAMLError, ValidationError) as e:
        first = str(e).splitlines()
        raise DeviceError(f"device profile {name_or_path}: invalid ({' '.join(first[:3])})") from None
