"""What "smaller" means in a run (`--shrink`): parameters or FLOPs, computed from the spec alone, or
CPU latency, measured. The step controller sizes its steps in the run's measure, the space orders a
parent's moves by it, and the end-of-run headline ("12.5x smaller") reports it.

Latency is a measurement, so it is noisy: one spec timed twice on a quiet 2-core machine differs by
a few percent, and by more under load (docs/usage.md has the figures). A run therefore measures each
spec once and keeps the value in its study (`latency_ms`, a table keyed by the spec's summary); every
later decision, in this process or after a resume, reads the table instead of timing again, so a
resumed run takes the decisions an uninterrupted one took."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .arch import VGGSpec
from .models import VGG

# Batch 1 on one CPU thread: the case a small model is deployed for, and the figure that moves least
# with what else the machine runs (the deploy figures use the same setting). The median of 21 timed
# calls after 5 warm-up calls (the first ones allocate buffers and pick kernels).
LATENCY_THREADS, LATENCY_WARMUP, LATENCY_REPEATS = 1, 5, 21


@dataclass(frozen=True)
class Measure:
    """One meaning of "smaller": how a spec's size is read, and the words for it."""

    name: str
    noun: str  # "parameters": a step removes a fraction of the parent's ...
    fewer: str  # the headline's word: "12.5x smaller", "3.1x fewer FLOPs", "2.0x faster"
    of_spec: Callable[[VGGSpec], float] | None  # None: measured (latency)


SIZES: dict[str, Measure] = {
    "params": Measure("params", "parameters", "smaller", lambda spec: spec.params()),
    "flops": Measure("flops", "FLOPs", "fewer FLOPs", lambda spec: spec.flops()),
    "latency": Measure("latency", "CPU latency", "faster", None),
}


def spec_key(spec: VGGSpec) -> str:
    """The latency table's key: the summary names every width of every block (the dataset's
    channels, classes and input size are the same for every node of a run)."""
    return spec.summary()


def latency_ms(spec: VGGSpec) -> float:
    """Median batch-1 forward time of a model built from `spec`, in milliseconds, on the CPU with
    LATENCY_THREADS threads. The weights are a fixed random draw: a dense conv net's time does not
    depend on their values."""
    torch.manual_seed(0)
    model = VGG(spec).eval()
    x = torch.randn(1, spec.in_channels, spec.input_size, spec.input_size)
    threads = torch.get_num_threads()
    torch.set_num_threads(LATENCY_THREADS)
    try:
        with torch.inference_mode():
            for _ in range(LATENCY_WARMUP):
                model(x)
            times = []
            for _ in range(LATENCY_REPEATS):
                start = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return round(1000 * statistics.median(times), 4)


class Sizes:
    """A run's measure of size, with its table of measured latencies. `record(table)` saves the
    table (the search writes it to the study) after new specs were timed, before any decision
    uses them."""

    def __init__(
        self,
        measure: str,
        table: dict[str, float] | None = None,
        record: Callable[[dict[str, float]], None] | None = None,
    ):
        self.measure = SIZES[measure]
        self.table = dict(table or {})
        self._record = record

    def measure_specs(self, *specs: VGGSpec) -> None:
        """Time the specs the table does not have yet and record them all in one write."""
        new = {spec_key(s): s for s in specs if spec_key(s) not in self.table}
        if not new:
            return
        self.table.update({key: latency_ms(spec) for key, spec in new.items()})
        if self._record is not None:
            self._record(dict(self.table))

    def latency(self, spec: VGGSpec) -> float:
        self.measure_specs(spec)
        return self.table[spec_key(spec)]

    def __call__(self, spec: VGGSpec) -> float:
        """The spec's size in the run's measure (a latency is timed once, then read from the table)."""
        of_spec = self.measure.of_spec
        return of_spec(spec) if of_spec is not None else self.latency(spec)

    def prepare(self, specs) -> None:
        """Before sizes are compared: time every spec of `specs` that needs it, in one record."""
        if self.measure.of_spec is None:
            self.measure_specs(*specs)


def headline(measure: str, root: float, final: float) -> str:
    """'12.5x smaller', '3.1x fewer FLOPs', '2.0x faster': how much smaller the final model is."""
    return f"{root / final:.1f}x {SIZES[measure].fewer}"


def shown(measure: str, value: float) -> str:
    """A size as a person reads it: '18,594 params', '1,204,224 FLOPs', '0.412 ms'."""
    return {"params": f"{value:,.0f} params", "flops": f"{value:,.0f} FLOPs"}.get(measure, f"{value:.3f} ms")


def size_changes(sizes: Sizes, root: VGGSpec, final: VGGSpec) -> str:
    """Root -> final in every measure, the run's --shrink measure first:
    '232,130 params -> 18,594 params (12.5x smaller; --shrink params), 5,017,600 FLOPs -> ...'."""
    first = sizes.measure.name
    parts = []
    for name in [first] + [n for n in SIZES if n != first]:
        of_spec = SIZES[name].of_spec or sizes.latency
        r, f = of_spec(root), of_spec(final)
        note = f"; --shrink {name}" if name == first else ""
        parts.append(f"{shown(name, r)} -> {shown(name, f)} ({headline(name, r, f)}{note})")
    return ", ".join(parts)
