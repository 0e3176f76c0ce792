"""Running training losses kept on the device, read back once per logging interval.

Reading a CUDA tensor on the host (``.item()``, ``float()``, ``if loss.isnan():``) makes the
host wait until the device has finished every queued kernel, so the next step cannot be
queued while this one runs. :class:`LossTracker` therefore sums the loss and its terms, and
notes the first non-finite batch, with device operations only; :meth:`LossTracker.read`
brings everything back in one transfer (and one collective across processes).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["LossReading", "LossTracker", "NonFiniteBatch"]


@dataclass
class NonFiniteBatch:
    """The first batch whose total loss was NaN or infinite.

    Attributes:
        batch: 0-based batch index within the epoch.
        step: 1-based optimizer step that batch was computing.
        process: Index of the process that saw it (the lowest of those that did, at the same batch).
        loss: That process's total loss there.
        terms: That process's loss terms there.
    """

    batch: int
    step: int
    process: int
    loss: float
    terms: dict[str, float]

    def describe(self) -> tuple[str, list[str]]:
        """What went non-finite, in words, and the non-finite terms' names (``["loss"]`` when only the total did)."""
        bad = [name for name, value in self.terms.items() if not math.isfinite(value)]
        if bad:
            values = ", ".join(f"{name!r}={self.terms[name]}" for name in bad)
            return f"non-finite loss term(s) {values} (total loss {self.loss})", bad
        return f"a non-finite total loss ({self.loss}) although every term is finite", ["loss"]


@dataclass
class LossReading:
    """The running losses of an epoch so far, over all processes.

    Attributes:
        samples: Training samples seen.
        loss: Mean total loss per sample.
        terms: Mean of each loss term per sample.
        non_finite: The first non-finite batch, or ``None``.
        bad_labels: ``(batch, process, lowest label, highest label)`` of the first batch with a
            class index outside the logits' classes, or ``None``.
    """

    samples: float
    loss: float
    terms: dict[str, float] = field(default_factory=dict)
    non_finite: NonFiniteBatch | None = None
    bad_labels: tuple[int, int, int, int] | None = None


class LossTracker:
    """Accumulates one epoch's losses on the device, without waiting for it.

    Args:
        device: Where the sums live (the Accelerator's device).
        num_processes: Processes training together; :meth:`read` gathers over them.
        gather: Concatenates a 1-D tensor over the processes (``accelerator.gather``); needed
            with several processes.
    """

    def __init__(self, device: torch.device | str, num_processes: int = 1,
                 gather: Callable[[Tensor], Tensor] | None = None) -> None:
        if num_processes > 1 and gather is None:
            raise ValueError("several processes need a gather function")
        self.device = torch.device(device)
        self.dtype = torch.float32 if self.device.type == "mps" else torch.float64  # mps has no float64
        self.num_processes = num_processes
        self.gather = gather
        self.names: list[str] = []  # term names; slot 0 of the vectors is the total loss
        self._sums = torch.zeros(1, dtype=self.dtype, device=self.device)  # size-weighted sums
        self._first_values = torch.zeros(1, dtype=self.dtype, device=self.device)  # at the first bad batch
        self._found = torch.zeros((), dtype=torch.bool, device=self.device)
        self._first_batch = torch.full((), -1, dtype=self.dtype, device=self.device)
        # The first batch with a class index outside [0, num_classes): found, batch, lowest and highest label.
        self._bad_labels = torch.tensor([0.0, -1.0, 0.0, 0.0], dtype=self.dtype, device=self.device)
        self._samples = 0
        self._steps: list[int] = []  # optimizer step of every batch, kept on the host

    def update(self, loss: Tensor, terms: Mapping[str, Tensor | float], size: int, step: int, *,
               labels: Tensor | None = None, num_classes: int | None = None) -> None:
        """Adds one batch: its total ``loss``, its ``terms`` (0-dim tensors or floats), its ``size``.

        ``step`` is the 1-based optimizer step the batch computes. Hard ``labels`` (class
        indices) are checked to lie in ``[0, num_classes)``: a cross-entropy silently ignores
        -100, and other values fail inside the device's kernels. No value is read back.
        """
        if labels is not None and num_classes is not None and labels.dim() == 1 and not labels.is_floating_point():
            self._check_labels(labels, num_classes, len(self._steps))
        new = [name for name in terms if name not in self.names]
        if new:  # a term first seen now: grow the vectors (no earlier batch had it)
            self.names.extend(new)
            zeros = torch.zeros(len(new), dtype=self.dtype, device=self.device)
            self._sums = torch.cat([self._sums, zeros])
            self._first_values = torch.cat([self._first_values, zeros])
        values = torch.stack([self._scalar(loss, "loss"), *(self._scalar(terms.get(name, 0.0), name) for name in self.names)])
        self._sums.add_(values, alpha=size)
        bad = ~torch.isfinite(values[0])
        first = bad & ~self._found
        self._found |= bad
        # torch.where keeps the decision on the device: the batch index is only known there.
        self._first_batch = torch.where(first, len(self._steps), self._first_batch)
        self._first_values = torch.where(first, values, self._first_values)
        self._samples += int(size)
        self._steps.append(int(step))

    def _check_labels(self, labels: Tensor, num_classes: int, batch: int) -> None:
        low, high = (value.to(self.dtype) for value in labels.aminmax())
        first = ((low < 0) | (high >= num_classes)) & (self._bad_labels[0] == 0)
        found = torch.stack([torch.ones((), dtype=self.dtype, device=self.device),
                             torch.full((), batch, dtype=self.dtype, device=self.device), low, high])
        self._bad_labels = torch.where(first, found.to(self.device), self._bad_labels)

    def read(self) -> LossReading:
        """The epoch's losses so far, over all processes: one device-to-host transfer.

        With several processes every process must call it at the same batch (it gathers).
        """
        count = len(self.names) + 1
        packed = self._pack()
        if self.num_processes > 1:
            packed = self.gather(packed)
        rows = packed.reshape(self.num_processes, -1).tolist()  # the one place the host waits
        samples = sum(row[-1] for row in rows)
        totals = [sum(row[i] for row in rows) for i in range(count)]
        per_sample = [total / max(samples, 1.0) for total in totals]
        reading = LossReading(samples=samples, loss=per_sample[0], terms=dict(zip(self.names, per_sample[1:])))
        bad = [(int(row[2 * count + 1]), process, row) for process, row in enumerate(rows) if row[2 * count] > 0]
        if bad:
            batch, process, row = min(bad, key=lambda item: item[:2])
            values = row[count: 2 * count]
            reading.non_finite = NonFiniteBatch(batch=batch, step=self._steps[batch], process=process,
                                                loss=values[0], terms=dict(zip(self.names, values[1:])))
        labelled = [(int(row[-4]), process, int(row[-3]), int(row[-2])) for process, row in enumerate(rows) if row[-5] > 0]
        if labelled:
            reading.bad_labels = min(labelled)
        return reading

    def _pack(self) -> Tensor:
        """Everything :meth:`read` needs, as one vector: sums, first bad values, found, first bad batch,
        the label check (found, batch, lowest, highest), samples."""
        return torch.cat([
            self._sums, self._first_values, self._found.to(self.dtype).reshape(1), self._first_batch.reshape(1),
            self._bad_labels, torch.full((1,), self._samples, dtype=self.dtype, device=self.device),
        ])

    def _scalar(self, value: Tensor | float, name: str) -> Tensor:
        if isinstance(value, Tensor):
            if value.numel() != 1:
                raise ValueError(f"loss term {name!r} must be a scalar, got a tensor of shape {tuple(value.shape)}")
            return value.detach().reshape(()).to(device=self.device, dtype=self.dtype)
        if isinstance(value, (str, bytes)) or not hasattr(value, "__float__"):
            raise TypeError(f"loss term {name!r} must be a 0-dim tensor or a float, got {type(value).__name__}")
        # torch.full writes the number on the device: no host-to-device copy to wait for.
        return torch.full((), float(value), dtype=self.dtype, device=self.device)
