"""A drop-in for ``onnxruntime.InferenceSession`` that guards every call: wrap a deployed model in one line.

Serving code written against onnxruntime keeps its calls::

    sess = GuardedSession("guarded.bundle")          # was: ort.InferenceSession("model.onnx")
    probs = sess.run(None, {"input": x})              # the model's own outputs, as before
    verdicts = sess.last_verdicts                     # this thread's verdicts for that call

The bundle's model is the adopted file (``abl-guard adopt``), which keeps the original outputs and adds logits and
taps, so one onnxruntime pass serves the caller and the detectors. Inputs are taken in the model's own form (its
layout, dtype and normalisation); detectors that perturb inputs receive them converted back to the guard's canonical
float NCHW [0, 1] form through the bundle's input contract. Thread-safe like :class:`~abl_guard.guard.runtime.Guard`:
onnxruntime sessions serve concurrent ``run`` calls, nothing is modified after loading, and ``last_verdicts`` is kept
per thread.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .runtime import Guard, Inspection, Verdict, needed_outputs


class GuardedSession:
    """``run(output_names, {input: x})`` like onnxruntime, plus the guard's verdicts for the same batch.

    ``bundle`` is a bundle path (directory or ``.zip``) or a loaded :class:`Guard`; the other arguments go to
    :meth:`Guard.load`. Batches larger than ``batch_size`` run in chunks (bounded memory) unless the model fixes its
    batch size, in which case the caller feeds batches of that size as with the bare model.
    """

    def __init__(self, bundle: str | os.PathLike | Guard, providers: Sequence[str] | None = None,
                 batch_size: int = 256, intra_op_threads: int | None = None) -> None:
        self.guard = bundle if isinstance(bundle, Guard) else Guard.load(
            bundle, providers=providers, batch_size=batch_size, intra_op_threads=intra_op_threads)
        self.model = self.guard.model
        self._session = self.model.session
        self._local = threading.local()
        self._needs_input = any("input" in d.requires for d in self.guard.detectors)
        self._guard_outputs = [n for n in needed_outputs(self.guard.detectors) if n != "input"]

    # ------------------------------------------------------------------ onnxruntime's surface

    def get_inputs(self) -> list[Any]:
        return self._session.get_inputs()

    def get_outputs(self) -> list[Any]:
        """The model's own outputs (the logits and taps the guard added are not listed)."""
        own = set(self.model.model_outputs)
        return [o for o in self._session.get_outputs() if o.name in own]

    def get_modelmeta(self) -> Any:
        return self._session.get_modelmeta()

    def get_providers(self) -> list[str]:
        return self._session.get_providers()

    def run(self, output_names: Sequence[str] | None, input_feed: Mapping[str, Any],
            run_options: Any = None) -> list[Any]:
        """The model's outputs ``output_names`` (None: all of its own) for ``input_feed``, as onnxruntime returns
        them; the verdicts of the batch are kept in :attr:`last_verdicts` for this thread."""
        return self.run_with_verdicts(output_names, input_feed, run_options)[0]

    # ------------------------------------------------------------------ verdicts

    @property
    def last_verdicts(self) -> list[Verdict] | None:
        """The verdicts of this thread's last :meth:`run` (None before the first)."""
        ins = getattr(self._local, "inspection", None)
        return None if ins is None else self.guard.verdicts(ins)

    @property
    def last_inspection(self) -> Inspection | None:
        """This thread's last batch as arrays (labels, flags, p-values); cheaper than :attr:`last_verdicts`."""
        return getattr(self._local, "inspection", None)

    def run_with_verdicts(self, output_names: Sequence[str] | None, input_feed: Mapping[str, Any],
                          run_options: Any = None) -> tuple[list[Any], list[Verdict]]:
        """``(outputs, verdicts)``: :meth:`run`'s outputs and one :class:`Verdict` per input of the batch."""
        outputs, ins = self._run(output_names, input_feed, run_options)
        self._local.inspection = ins
        return outputs, self.guard.verdicts(ins)

    def _run(self, output_names: Sequence[str] | None, input_feed: Mapping[str, Any],
             run_options: Any) -> tuple[list[Any], Inspection]:
        own = list(self.model.model_outputs)
        names = own if output_names is None else list(output_names)
        unknown = [n for n in names if n not in own]
        if unknown:
            raise ValueError(f"unknown output names {unknown}; the model's outputs are {own}")
        extra = set(input_feed) - {self.model.input_name}
        if extra or self.model.input_name not in input_feed:
            raise ValueError(f"the model takes one input {self.model.input_name!r}; got {sorted(input_feed)}")
        x = input_feed[self.model.input_name]
        n = len(x)
        step = self.model.batch_size
        if self.model.fixed_batch or n <= step:
            return self._run_chunk(names, x, run_options)
        parts = [self._run_chunk(names, x[s : s + step], run_options) for s in range(0, n, step)]
        outputs = [np.concatenate(col) if isinstance(col[0], np.ndarray) else [v for p in col for v in p]
                   for col in zip(*(p[0] for p in parts))]
        return outputs, Inspection.concat([p[1] for p in parts])

    def _run_chunk(self, names: Sequence[str], x: Any, run_options: Any) -> tuple[list[Any], Inspection]:
        fetch = [*names, *(n for n in self._guard_outputs if n not in names)]
        arrays = self._session.run(fetch, {self.model.input_name: x}, run_options)
        got = dict(zip(fetch, arrays))
        obs: dict[str, np.ndarray] = {n: got[n] for n in self._guard_outputs}
        if self._needs_input:
            obs["input"] = self.model.contract.from_native(np.asarray(x))
        return [got[n] for n in names], self.guard.inspect_observations(obs)
