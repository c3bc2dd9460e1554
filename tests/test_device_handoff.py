"""Training on one device and exporting on another (issue: a GPU fit left the student on CUDA and the ONNX
export fed it CPU tensors). CI has no GPU: the meta device stands in for it. After the real fit, the
student is moved to meta, as Lightning leaves it on the device it trained on; every stage after
distillation must still get a CPU model with the best epoch's weights."""
import pytest
import pytorch_lightning as pl
import torch

import compressor


def test_a_student_left_on_another_device_after_fit_still_exports(tiny_recipe, tmp_path, monkeypatch):
    real_fit = pl.Trainer.fit
    best = {}

    def fit_then_leave_it_elsewhere(self, module, *args, **kwargs):
        out = real_fit(self, module, *args, **kwargs)
        state = torch.load(self.checkpoint_callback.best_model_path, map_location="cpu", weights_only=True)
        best.update({k.removeprefix("student."): v for k, v in state["state_dict"].items() if k.startswith("student.")})
        module.student.to("meta")  # where a GPU fit leaves it: not on the CPU
        return out

    monkeypatch.setattr(pl.Trainer, "fit", fit_then_leave_it_elsewhere)
    handed = []
    import exporters.onnx as onnx_exporter

    real_export = onnx_exporter.export_onnx

    def spy(model, example_inputs, path, **kw):
        handed.append({t.device.type for t in [*model.parameters(), *model.buffers(), *example_inputs]})
        return real_export(model, example_inputs, path, **kw)

    monkeypatch.setattr(onnx_exporter, "export_onnx", spy)
    tiny_recipe["targets"] = []
    bundle = compressor.run(tiny_recipe, tmp_path / "b", log=lambda s: None)
    man = compressor.verify(bundle)
    assert handed and all(devices == {"cpu"} for devices in handed)
    distill = next(s for s in man["stages"] if s["name"] == "distill")["metrics"]
    assert distill["trained_on"]["device"] == "cpu" and distill["trained_on"]["precision"]
    assert man["quality"]["student"]["accuracy"] == pytest.approx(man["quality"]["student"]["onnx_accuracy"], abs=0.01)
    shipped = torch.load(bundle / "model" / "student.pt", weights_only=True)
    assert best and shipped.keys() == best.keys()
    assert all(torch.equal(shipped[k], best[k]) for k in best)  # the best epoch's weights, not empty storage
