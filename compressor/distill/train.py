"""The distill stage's training: a Lightning Trainer around DistillModule, configured by the recipe."""
from __future__ import annotations

import logging
import sys
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch

from ..errors import StageError, UserError
from ..precision import check_finite
from ..schedule import lazy_rows
from . import build_loss
from .module import DistillModule


def quiet_lightning() -> None:
    """Lightning's start-up banners (GPU available: False, tips) are noise in a pipeline's log."""
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("pytorch_lightning", "lightning")):
            logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*litlogger.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")


class Hold(pl.Callback):
    """Tests only (COMPRESSOR_HOLD, compressor/hold.py): wait at the start of each epoch after the first (so
    a checkpoint exists) while the file exists."""

    def on_train_epoch_start(self, trainer, pl_module):
        from ..hold import hold

        if trainer.current_epoch > 0:
            hold("epoch")


class EpochLog(pl.Callback):
    """One line per epoch where there is no terminal for a progress bar (CI, logs)."""

    def __init__(self, log, metric: str = "acc"):
        self.emit, self.t0, self.metric = log, time.time(), metric

    def on_train_epoch_start(self, trainer, pl_module):
        self.t0 = time.time()

    def on_train_epoch_end(self, trainer, pl_module):  # runs after the epoch's validation
        if not trainer.is_global_zero:  # one line per epoch, not one per rank
            return
        m = trainer.callback_metrics
        loss = float(m["train_loss"]) if "train_loss" in m else float("nan")
        self.emit(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}: train loss {loss:.4f}, "
                 f"val {self.metric} {float(m.get(f'val_{self.metric}', float('nan'))):.4f} "
                 f"({time.time() - self.t0:.1f} s)")


def precision(trainer_spec) -> tuple[str, str]:
    """(Lightning precision, why): compressor.precision.resolve for the trainer's accelerator (``auto``: bf16
    where the hardware runs it natively)."""
    from ..precision import resolve

    return resolve(trainer_spec.precision, trainer_spec.accelerator)


def fit(student, teacher, data, spec, data_spec, ckpt_dir: Path, seed: int = 0, log=print,
        val_metric: str = "acc", as_it_came: bool = False) -> dict:
    """Distil ``teacher`` into ``student`` in place (best validation epoch kept); return training metrics.
    ``as_it_came``: the student comes with what it knows (a cut teacher, the search's finalist), so it is scored
    before training and counts as epoch 0: where no epoch beats it, it ships as it came, with a warning. (A student
    from random weights does not: one that scores by chance above a bad epoch is no student to ship.)"""
    pl.seed_everything(seed, workers=True, verbose=False)
    quiet_lightning()
    frozen = freeze(student, getattr(spec, "freeze", []), log)
    try:
        return _fit(student, teacher, data, spec, data_spec, ckpt_dir, seed, log, val_metric, as_it_came)
    finally:
        for p in frozen:
            p.requires_grad_(True)


def freeze(student, paths, log=print) -> list:
    """Turn off the gradients of the weights under ``paths`` (distill.freeze) and return them; a UserError names
    a path the student lacks, or a list that leaves nothing to train."""
    from .hooks import resolve

    if not paths:
        return []
    params = list(dict.fromkeys(p for path in paths for p in resolve(student, path, "student").parameters()
                                if p.requires_grad))
    if len(params) == sum(p.requires_grad for p in student.parameters()):
        raise UserError(f"distill.freeze {paths} holds every trainable weight of the student: nothing would train")
    for p in params:
        p.requires_grad_(False)
    n = sum(p.numel() for p in params)
    total = sum(p.numel() for p in student.parameters())
    log(f"distill: {n:,} of {total:,} weights frozen ({', '.join(paths)})")
    return params


def _fit(student, teacher, data, spec, data_spec, ckpt_dir: Path, seed: int, log, val_metric: str,
         as_it_came: bool = False) -> dict:
    terms = [(l.weight, build_loss(l.name, **l.params)) for l in spec.losses]
    for (_, t), l in zip(terms, spec.losses):
        t.name = l.name
    module = DistillModule(student, teacher, terms, lr=spec.lr, weight_decay=spec.weight_decay,
                           optimizer=spec.optimizer, schedule=spec.schedule, epochs=spec.epochs,
                           example=data.tensors("train", limit=2)[0],  # sizes feature adapters
                           val_metric=val_metric)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=f"val_{val_metric}", mode="max",
                                        save_last=True, save_top_k=1)
    interactive = sys.stderr.isatty()
    callbacks = [ckpt, pl.callbacks.RichProgressBar() if interactive else EpochLog(log, val_metric)]
    from ..hold import active

    if active():
        callbacks.append(Hold())
    t = spec.trainer
    prec, prec_why = precision(t)
    if t.precision == "auto":
        log(f"distill: precision {prec} ({prec_why})")
    trainer = pl.Trainer(max_epochs=spec.epochs, accelerator=t.accelerator, devices=t.devices,
                         strategy=t.strategy, num_nodes=t.num_nodes, precision=prec,
                         deterministic=t.deterministic, callbacks=callbacks, logger=False,
                         enable_progress_bar=interactive, enable_model_summary=False,
                         default_root_dir=str(ckpt_dir.parent), num_sanity_val_steps=0, **t.extra)
    # The cache runs where the teacher is now (the CPU, before fit moves anything): at the trainer's precision
    # when training runs on that kind of device too, else in fp32 (a GPU's bf16 rounding cannot be had on a CPU,
    # and a CPU without bf16 would only emulate it).
    here = next((p.device.type for p in teacher.parameters()), "cpu")
    cached = _cache_teacher(module, teacher, data, spec, ckpt_dir.parent / "teacher-cache", log,
                            prec if trainer.strategy.root_device.type == here else "32-true")
    # Batches of similar-length sentences where the inputs are tokens (data.group_by_length); on one device only:
    # a distributed strategy (DDP, even on one device) swaps in its own sampler, which LengthGrouped cannot hold.
    by_length = data_spec.group_by_length is not False and isinstance(trainer.strategy, pl.strategies.SingleDeviceStrategy)
    if cached:
        from .cache import Indexed, collate_indexed

        train = data.loader("train", data_spec.batch_size, shuffle=True, workers=data_spec.workers, seed=seed,
                            by_length=by_length, dataset=Indexed(data.train), collate_fn=collate_indexed)
    else:
        train = data.loader("train", data_spec.batch_size, shuffle=True, workers=data_spec.workers, seed=seed,
                            by_length=by_length)
    from ..data import LengthGrouped

    if isinstance(train.batch_sampler, LengthGrouped):
        log("distill: batches of sentences of similar length (data.group_by_length)")
    val = data.loader("val", data_spec.batch_size, workers=data_spec.workers, by_length=by_length)
    last = ckpt_dir / "last.ckpt"
    saved_lazy = None  # whether the checkpoint's optimizer updated token tables lazily
    if last.is_file():
        try:
            saved = torch.load(last, map_location="cpu", weights_only=True)
            done = saved["epoch"]
            saved_lazy = any(isinstance(o, dict) and "tables" in o for o in saved.get("optimizer_states", []))
            log(f"resuming distillation after epoch {done} from {last}")
        except Exception as e:  # a checkpoint cut short by a crash: start the stage over
            log(f"ignoring unreadable checkpoint {last} ({type(e).__name__}); distilling from the start")
            last.unlink()
    student.train()  # check_fits left it in eval mode; Lightning keeps the modes it finds
    # Token tables update only the rows a batch uses (distill.lazy_embeddings); one device only, as DDP would
    # all-reduce the sparse gradients densely (and NCCL cannot reduce them at all), on a CPU or CUDA (sparse
    # kernels), and without gradient clipping (torch's norm has no sparse kernel).
    lazy = (getattr(spec, "lazy_embeddings", True) and spec.optimizer == "adamw"
            and isinstance(trainer.strategy, pl.strategies.SingleDeviceStrategy)
            and trainer.strategy.root_device.type in ("cpu", "cuda") and not t.extra.get("gradient_clip_val"))
    start = None
    if as_it_came and not last.is_file() and isinstance(trainer.strategy, pl.strategies.SingleDeviceStrategy):
        # The student as it comes (a cut teacher, the search's finalist) scored before training: a rate too high to
        # fine-tune it can leave every epoch below where it started (hf_mobilenet's cut: 0.872, then 0.728 after
        # 3 epochs at 3e-3 and 0.956 at 1e-3), which the best epoch alone does not show.
        start = trainer.validate(module, val, verbose=False)[0].get(f"val_{val_metric}")
        came = {k: v.detach().clone() for k, v in student.state_dict().items()}
        student.train()
    t0 = time.time()
    try:
        with lazy_rows(student, lazy) as module.tables:
            if saved_lazy is not None and saved_lazy != bool(module.tables):
                raise UserError(f"distill: {last} was saved by an optimizer that updated the token tables "
                                f"{'lazily' if saved_lazy else 'densely'}, and this run would update them "
                                f"{'densely' if saved_lazy else 'lazily'} (distill.lazy_embeddings, the device count, "
                                "gradient clipping); run as that run did, or with --force")
            if module.tables:
                log(f"distill: {sum(t.numel() for t in module.tables):,} token-table weights update only the rows "
                    "each batch uses (distill.lazy_embeddings)")
            trainer.fit(module, train, val, ckpt_path=str(last) if last.is_file() else None)
    except FloatingPointError as e:
        raise StageError("distill", f"{e} (the last good checkpoint is {last})") from None
    except SystemExit:
        if trainer.interrupted:  # Lightning turns Ctrl-C into sys.exit(1) after its own clean-up
            raise KeyboardInterrupt from None
        raise
    device = str(trainer.strategy.root_device)
    # Every stage after this one (export, ONNX Runtime parity, quantization calibration, quality) runs on
    # the CPU, whatever device trained: the student comes back there, with the best epoch's weights.
    # (After a GPU fit Lightning leaves the module on the GPU, and the ONNX export fed it CPU tensors.)
    try:
        student.cpu()  # non-persistent buffers (a Hugging Face model's position_ids) are in no checkpoint
    except NotImplementedError:
        # A device whose tensors cannot be copied out (the meta device the tests stand in for a GPU with):
        # fresh CPU storage, every tensor of which the checkpoint then fills.
        student.to_empty(device="cpu")
    best = ckpt.best_model_path
    if best:
        state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
        student.load_state_dict({k[len("student."):]: v for k, v in state.items() if k.startswith("student.")})
    student.eval()
    check_finite(student, "the student", prec, "distill.trainer.precision")
    score = float(ckpt.best_model_score or float("nan"))
    kept = "best epoch"
    if start is not None and score < start:  # the student as it came is a candidate too, as if epoch 0
        student.load_state_dict(came)
        kept = "as it came"
        log(f"distill: warning: every epoch scored below the student as it came (val {val_metric} {score:.4f} at best, "
            f"{start:.4f} before training), so it ships as it came: distill.lr {spec.lr:g} may be too high to "
            "fine-tune it (a cut teacher takes a lower rate than a student trained from scratch)")
    return {"epochs": trainer.current_epoch, f"best_val_{val_metric}": score,
            **({f"start_val_{val_metric}": float(start), "kept": kept} if start is not None else {}),
            "train_seconds": round(time.time() - t0, 1), "final_train_loss":
            float(trainer.callback_metrics.get("train_loss", float("nan"))),
            "teacher_outputs": "cached" if cached else "every batch",
            "trained_on": {"device": device, "precision": prec, "strategy": str(t.strategy),
                           "devices": t.devices}}


def _cache_teacher(module: DistillModule, teacher, data, spec, directory: Path, log, precision: str = "32-true") -> bool:
    """Give ``module`` the teacher's outputs on the training split, computed once (at the trainer's
    ``precision``, as every batch would run it), where that is safe; log which way the teacher runs."""
    from ..data import collate
    from .cache import deterministic, teacher_features, teacher_outputs

    want = getattr(spec, "cache_teacher", "auto")
    why = None
    if want is False:
        why = "distill.cache_teacher is false"
    elif not deterministic(data.train):
        why = "the training data changes between reads (augmentation)"
    if why:
        log(f"distill: the teacher runs on every batch ({why})")
        return False
    if module.teacher_paths:
        got = teacher_features(teacher, data.train, directory, collate, module.teacher_paths, log=log,
                               precision=precision)
        if got is None:
            return False
        module.teacher_feature_cache, module.token_axes = got
    module.teacher_cache = teacher_outputs(teacher, data.train, directory, collate, log=log, precision=precision)
    return True
