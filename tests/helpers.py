"""Test helpers that runs load by import path (``+callbacks.kill._target_=helpers.KillAtStep``)."""

import json
import os
import signal
import signal as signal_module

import lightning as L
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class KillAtStep(L.Callback):
    """SIGKILL this process once the given optimizer step is done (before that step's checkpoint is written)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class RecordBatches(L.Callback):
    """Append (step, epoch, first sample index of each row, learning rate, weight checksum) of every training batch
    to a file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx) -> None:
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        checksum = sum(float(p.double().sum()) for p in pl_module.parameters())
        with open(self.path, "a") as f:
            f.write(
                json.dumps(
                    [
                        trainer.global_step,
                        trainer.current_epoch,
                        batch["sample_index"][:, 0].tolist(),
                        lr,
                        checksum,
                    ]
                )
                + "\n"
            )


class FailIfSeed(L.Callback):
    """Raise at the start of training when the run's seed is ``failing`` (a failed job in a sweep)."""

    def __init__(self, seed: int, failing: int) -> None:
        self.seed, self.failing = int(seed), int(failing)

    def on_train_start(self, *args) -> None:
        if self.seed == self.failing:
            raise RuntimeError(f"planned failure of the job with seed {self.seed}")


class PoisonAtStep(L.Callback):
    """Fill the first weight matrix with NaN before the batch of the given optimizer step (a corrupt weight)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            next(pl_module.parameters()).data.fill_(float("nan"))


class PoisonGradientAtStep(L.Callback):
    """Make one gradient NaN in the backward pass of the given optimizer step only (a one-off overflow)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step + 1 == self.step:
            grad = next(p for p in pl_module.parameters() if p.grad is not None).grad
            (grad.to_local() if hasattr(grad, "to_local") else grad).view(-1)[0] = float("nan")  # FSDP2: a shard


class SignalAtStep(L.Callback):
    """Send this process ``signal`` (a name: SIGTERM, SIGINT, SIGUSR1) while the batch after optimizer step ``step``
    trains, as a scheduler or a user would in the middle of a step."""

    def __init__(self, step: int, signal: str = "SIGTERM") -> None:
        self.step, self.signum = step, getattr(signal_module, signal)
        self.sent = False

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step == self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)


class SignalAtStepIfSeed(SignalAtStep):
    """``SignalAtStep`` in the job of a sweep whose seed is ``seed`` only."""

    def __init__(self, step: int, seed: int, run_seed: int, signal: str = "SIGTERM") -> None:
        super().__init__(step, signal)
        self.sent = int(seed) != int(run_seed)


class FullDiskAfterStep(L.Callback):
    """From the save after optimizer step ``step`` on, every ``torch.save`` writes part of its file, then fails as a
    full disk does (``OSError`` ENOSPC): a save that runs out of space in the middle."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step < self.step or getattr(torch, "_full_disk", False):
            return
        import errno

        def full_disk(obj, f, *args, **kwargs) -> None:
            f.write(b"PK\x03\x04 part of a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        torch._full_disk = True
        torch.save = full_disk


class HostReads(L.Callback):
    """The calls that read a device tensor's value on the host, per optimizer step: from one batch's start to the next
    (forward, backward, the optimizer step and every hook and callback between), the batches' loading left out.

    On a GPU each such read waits for the device's queued work (a host synchronisation); on a CPU the same calls run
    and are counted here: ``Tensor.item``, ``tolist``, ``bool``/``int``/``float`` of a tensor, ``cpu``, ``numpy``,
    and the ops whose output size depends on the values (``nonzero``, ``masked_select``, ``unique``...). A tensor
    that would live on the host on a GPU is not counted: one made by ``cpu()``, or by a factory given no device
    (``torch.tensor(x)``), or computed from such tensors only; every other tensor is taken for a device tensor
    (``.to(...)`` is followed, not judged: on a CPU the module's device and the host are one). ``reads[step]``
    counts the reads by kind and by the innermost calling line outside torch."""

    METHODS = frozenset({"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy"})
    OPS = frozenset({"nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive"})
    FACTORIES = frozenset({"tensor", "as_tensor", "from_numpy", "zeros", "ones", "empty", "full", "arange",
                           "linspace", "rand", "randn", "randint"})  # fmt: skip

    def __init__(self) -> None:
        from collections import Counter

        self.reads: dict[int, Counter] = {}
        self._counter = Counter
        self._host: dict[int, object] = {}  # id -> weak reference, of the tensors that would be host tensors
        self._modes: list = []

    def _is_host(self, tensor: torch.Tensor) -> bool:
        ref = self._host.get(id(tensor))
        return ref is not None and ref() is tensor

    def _mark_host(self, output) -> None:
        import weakref

        from torch.utils._pytree import tree_leaves

        for tensor in tree_leaves(output):
            if isinstance(tensor, torch.Tensor):
                key = id(tensor)
                self._host[key] = weakref.ref(tensor, lambda _, key=key: self._host.pop(key, None))

    def _record(self, kind: str) -> None:
        import traceback

        frames = traceback.extract_stack()
        if any("torch/utils/data/" in f.filename for f in frames):  # a batch being loaded: host tensors
            return
        line = [f for f in frames if "/torch/" not in f.filename and f.filename != __file__][-1]
        where = line.filename.rsplit("site-packages/", 1)[-1].replace(f"{REPO}/", "")
        self.reads[self._step][(kind, f"{where}:{line.lineno} {line.name}")] += 1

    def _start(self, step: int) -> None:
        from torch.overrides import TorchFunctionMode
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        audit = self

        class Methods(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                name = getattr(func, "__name__", None)
                tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
                if name in HostReads.METHODS and not audit._is_host(args[0]):
                    audit._record(name)
                output = func(*args, **kwargs)
                if (
                    name in ("cpu", "numpy")
                    or (name in HostReads.FACTORIES and kwargs.get("device") is None)
                    or (tensors and all(audit._is_host(t) for t in tensors))
                ):
                    audit._mark_host(output)
                return output

        class Ops(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func.overloadpacket.__name__ in HostReads.OPS and not audit._is_host(args[0]):
                    audit._record(func.overloadpacket.__name__)
                return func(*args, **(kwargs or {}))

        self._step, self.reads[step] = step, self._counter()
        self._modes = [Methods(), Ops()]
        for mode in self._modes:
            mode.__enter__()

    def _stop(self) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(None, None, None)
        self._modes = []

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        self._stop()
        self._start(trainer.global_step + 1)

    def on_train_end(self, *args) -> None:
        self._stop()

    def on_exception(self, *args) -> None:  # a failing run leaves no mode behind for the tests after it
        self._stop()
