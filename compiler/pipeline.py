"""`Pipeline`: run passes in order under instruments (timing, IR dump, numerical verification)."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from .errors import OptionError, PassError, SqueezerError, VerificationError
from .graph import Graph, flatten_tensors
from .pass_infra import Pass


class Instrument:
    """Hooks around a Pipeline run and every pass in it. Override what you need."""

    def before_pipeline(self, graph: Graph) -> None:
        pass

    def before_pass(self, pass_: Pass, graph: Graph) -> None:
        pass

    def after_pass(self, pass_: Pass, before: Graph, after: Graph, seconds: float) -> None:
        pass


class Timing(Instrument):
    """Wall time of each pass, in ``self.seconds`` keyed by position and name."""

    def __init__(self) -> None:
        self.seconds: list[tuple[str, float]] = []

    def before_pipeline(self, graph: Graph) -> None:
        self.seconds = []

    def after_pass(self, pass_: Pass, before: Graph, after: Graph, seconds: float) -> None:
        self.seconds.append((pass_.name, seconds))


class DumpIR(Instrument):
    """Writes the fx code and node table after each pass to ``dir/NN-name.txt``."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.count = 0

    def before_pipeline(self, graph: Graph) -> None:
        self.count = 0

    def after_pass(self, pass_: Pass, before: Graph, after: Graph, seconds: float) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.count += 1
        path = self.directory / f"{self.count:02d}-{pass_.name}.txt"
        path.write_text(f"# {pass_.spec()}\n{after.module.code}\n\n{after}\n")


def max_abs_diff(a: Any, b: Any) -> float:
    fa, fb = flatten_tensors(a), flatten_tensors(b)
    if len(fa) != len(fb) or any(x.shape != y.shape for x, y in zip(fa, fb)):
        return float("inf")
    return max((float((x.double() - y.double()).abs().max()) for x, y in zip(fa, fb) if x.numel()), default=0.0)


class Verify(Instrument):
    """Compares outputs on the example inputs before/after each pass against a tolerance.

    ``tolerance``: a float for every pass, or a mapping pass-name -> float; passes without one use
    their own ``verify_tolerance`` (lossy passes, ``None``, are then not checked).
    """

    def __init__(self, tolerance: float | Mapping[str, float] | None = None) -> None:
        given = tolerance.items() if isinstance(tolerance, Mapping) else [("", tolerance)] if tolerance is not None else []
        for name, tol in given:
            if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0 or math.isinf(tol):
                raise OptionError(f"verify tolerance{f' for {name!r}' if name else ''} must be a finite number "
                                  f">= 0, got {tol!r}")
        self.tolerance = tolerance
        self.errors: list[tuple[str, float]] = []
        self.unchecked: list[str] = []  # lossy passes run without a tolerance

    def before_pipeline(self, graph: Graph) -> None:
        self.errors, self.unchecked = [], []

    def _tol(self, pass_: Pass) -> float | None:
        if isinstance(self.tolerance, Mapping):
            return self.tolerance.get(pass_.name, pass_.verify_tolerance)
        return self.tolerance if self.tolerance is not None else pass_.verify_tolerance

    def after_pass(self, pass_: Pass, before: Graph, after: Graph, seconds: float) -> None:
        tol = self._tol(pass_)
        if tol is None:
            self.unchecked.append(pass_.name)
            return
        err = max_abs_diff(before.run_example(), after.run_example())
        self.errors.append((pass_.name, err))
        if not err <= tol:
            raise VerificationError(f"pass '{pass_.name}' changed the outputs by {err:.3g} "
                                    f"(max abs) on the example inputs; its tolerance is {tol:g}")


class Pipeline:
    """Runs ``passes`` in order. ``verify`` turns on the Verify instrument (True, or tolerances)."""

    def __init__(self, passes: Sequence[Pass], *, verify: bool | float | Mapping[str, float] = False,
                 dump_dir: str | Path | None = None, instruments: Sequence[Instrument] = ()) -> None:
        for p in passes:
            if not isinstance(p, Pass):
                raise TypeError(f"Pipeline takes Pass objects, got {type(p).__name__}: {p!r}")
        self.passes = list(passes)
        self.timing = Timing()
        self.instruments: list[Instrument] = [self.timing, *instruments]
        if dump_dir is not None:
            self.instruments.append(DumpIR(dump_dir))
        if verify is not False:
            self.instruments.append(Verify(None if verify is True else verify))

    def __call__(self, graph: Graph) -> Graph:
        done: list[str] = []
        for ins in self.instruments:
            ins.before_pipeline(graph)
        for p in self.passes:
            for ins in self.instruments:
                ins.before_pass(p, graph)
            start = time.perf_counter()
            try:
                new = p(graph)
            except Exception as exc:  # noqa: BLE001 - re-raised naming the pass
                kind = PassError if not isinstance(exc, SqueezerError) or isinstance(exc, PassError) else type(exc)
                raise kind(f"pass '{p.name}' ({p.spec()}) failed after passes {done or 'none'}: "
                           f"{type(exc).__name__}: {exc}") from exc
            seconds = time.perf_counter() - start
            for ins in self.instruments:
                try:
                    ins.after_pass(p, graph, new, seconds)
                except VerificationError as exc:
                    raise VerificationError(f"{exc} (passes before it: {done or 'none'})") from exc
                except Exception as exc:  # noqa: BLE001 - an instrument's failure is not the pass's
                    raise PassError(f"instrument {type(ins).__name__} failed after pass '{p.name}': "
                                    f"{type(exc).__name__}: {exc}") from exc
            graph = new
            done.append(p.name)
        return graph

    def __repr__(self) -> str:
        return f"Pipeline([{', '.join(p.spec() for p in self.passes)}])"
