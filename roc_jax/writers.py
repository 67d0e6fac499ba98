"""Metric writers: TensorBoard event files (tensorboardX) and a JSON-lines file in the workdir.

``clu.metric_writers`` imports TensorFlow at import time and TensorFlow is not a dependency here,
so these small writers keep clu's method names (``write_scalars``, ``write_hparams``, ``flush``,
``close``) and can be swapped for clu's where TensorFlow exists.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


class MetricWriter:
    """The clu ``MetricWriter`` interface (the subset this project uses)."""

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        raise NotImplementedError

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.flush()


class JsonlWriter(MetricWriter):
    """Appends one JSON object per ``write_scalars`` call: ``{"step", "time", **scalars}``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = self.path.open("a")

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        row = {"step": int(step), "time": time.time()}
        row.update({k: float(v) for k, v in scalars.items()})
        self._f.write(json.dumps(row) + "\n")

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        self._f.write(json.dumps({"hparams": _jsonable(hparams)}) + "\n")

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


class TensorBoardWriter(MetricWriter):
    """TensorBoard event files through tensorboardX (no TensorFlow needed)."""

    def __init__(self, logdir: str | Path) -> None:
        from tensorboardX import SummaryWriter

        self._w = SummaryWriter(logdir=str(logdir))

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        for k, v in scalars.items():
            self._w.add_scalar(k, float(v), global_step=int(step))

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        flat = {k: v if isinstance(v, int | float | str | bool) else str(v)
                for k, v in _flatten(_jsonable(hparams)).items()}
        self._w.add_text("hparams", json.dumps(flat, indent=1))

    def flush(self) -> None:
        self._w.flush()

    def close(self) -> None:
        self._w.close()


class MultiWriter(MetricWriter):
    """Forwards every call to several writers."""

    def __init__(self, writers: Sequence[MetricWriter]) -> None:
        self.writers = list(writers)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        for w in self.writers:
            w.write_scalars(step, scalars)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        for w in self.writers:
            w.write_hparams(hparams)

    def flush(self) -> None:
        for w in self.writers:
            w.flush()

    def close(self) -> None:
        for w in self.writers:
            w.close()


def create_default_writer(workdir: str | Path, *, enabled: bool = True) -> MetricWriter:
    """TensorBoard events under ``workdir/tb`` and ``workdir/metrics.jsonl``.

    ``enabled=False`` (non-zero hosts of a multi-host run) returns a writer that drops everything.
    """
    if not enabled:
        return MultiWriter([])
    workdir = Path(workdir)
    return MultiWriter([TensorBoardWriter(workdir / "tb"), JsonlWriter(workdir / "metrics.jsonl")])


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out
