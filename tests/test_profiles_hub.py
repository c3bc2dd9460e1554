"""Every shipped device profile loads, names a runtime that has a backend, and states its figures' source
(like litgpt's test_config_hub)."""
from importlib import resources

import pytest

from devices import DEVICES, DeviceError, Measurement, get_device, load_profile
from devices.measurement import peak_gflops

SHIPPED = sorted(p.name[:-5] for p in (resources.files("profiles") / "devices").iterdir() if p.name.endswith(".yaml"))


def test_all_targets_of_issue_6_ship():
    for name in ("local-cpu", "raspberry-pi-5", "jetson-orin-nano", "h100", "intel-core-ultra-npu",
                 "openvino-cpu", "ethos-u55-128", "ethos-u85-256"):
        assert name in SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_profile_loads_and_has_a_backend(name):
    p = load_profile(name)
    assert p.name == name, "the file name and the profile's name must agree"
    assert p.runtime in DEVICES
    assert p.precisions and len(set(p.precisions)) == len(p.precisions)
    device = get_device(p)  # constructing a device imports nothing heavy and never fails
    why = device.why_unavailable()
    assert why is None or isinstance(why, str) and why
    if p.peak_gflops is not None or p.memory_bandwidth_gbs is not None:
        assert p.source.strip(), f"{name}: peak figures need a source"
    by = p.options.get("peak_gflops_by_precision", {})
    assert set(by) <= set(p.precisions) | {"tf32"}, f"{name}: a peak for a precision it does not list"
    if not p.local:
        assert p.connection.startswith("ssh://")
        assert "remote" in why


@pytest.mark.parametrize("name", [n for n in SHIPPED if n != "local-cpu"])
def test_new_profiles_state_peaks(name):
    p = load_profile(name)
    assert p.peak_gflops and p.memory_bandwidth_gbs and p.source


@pytest.mark.parametrize("name", [n for n in SHIPPED if load_profile(n).runtime == "vela"])
def test_ethos_profiles_name_a_vela_configuration(name):
    from configparser import ConfigParser

    ethosu = pytest.importorskip("ethosu")
    from pathlib import Path

    p = load_profile(name)
    assert p.options["accelerator_config"] == name  # ethos-u55-128 etc. are Vela's own names
    ini = ConfigParser()
    ini.read(Path(list(ethosu.__path__)[0]) / "config_files" / "Arm" / "vela.ini")  # a namespace package
    assert f"System_Config.{p.options['system_config']}" in ini.sections()
    assert f"Memory_Mode.{p.options['memory_mode']}" in ini.sections()


def test_unknown_runtime_is_a_one_line_error(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text("name: x\nkind: cpu\nruntime: nosuch\n")
    with pytest.raises(DeviceError, match="no backend for runtime 'nosuch'"):
        get_device(str(f))


def _m(**kw):
    base = dict(device="d", runtime="r", runtime_version="1", precision="fp32", batch=4, threads=1, input_shapes={},
                warmup=0, runs=1, p50_ms=2.0, p90_ms=2.0, p99_ms=2.0, mean_ms=2.0, std_ms=0.0, min_ms=2.0, cv=0.0,
                estimated=False)
    return Measurement(**{**base, **kw})


def test_roofline_golden_values():
    p = load_profile("h100")
    m = _m().add_roofline(5e6, p)  # 5 MFLOPs per sample, batch 4, 2 ms -> 10 GFLOP/s
    assert m.gflops == pytest.approx(10.0)
    assert m.peak_gflops == 67000 and m.roofline == pytest.approx(10 / 67000)
    m16 = _m(precision="fp16").add_roofline(5e6, p)
    assert m16.peak_gflops == pytest.approx(989400)  # the per-precision peak, not the fp32 one
    assert _m().add_roofline(None, p).roofline is None
    assert peak_gflops(load_profile("local-cpu"), "fp32") is None
    assert _m().add_roofline(5e6, load_profile("local-cpu")).roofline is None  # no peak, no ratio
    d = _m().add_roofline(5e6, p).to_dict()
    assert Measurement.from_dict(d).roofline == pytest.approx(10 / 67000)
