"""`Pass` and `PassReport`: a pass is a frozen dataclass of validated options mapping Graph -> Graph.

Contract (in the spirit of torch.fx.passes.infra and tvm.relax.transform):
* options are dataclass fields, checked in ``validate()`` at construction — a bad option raises
  :class:`OptionError` naming the option and the allowed range;
* ``name`` is kebab-case and is what the CLI and recipes use (``channel-pruning:ratio=0.5``);
* ``apply(graph)`` never mutates its input and does the bookkeeping once for every pass: check
  ``requires``, copy, ``run`` (which rewrites the copy and fills a report), recompile, check
  ``ensures``, record the before/after summary and the spec; it returns a :class:`PassResult`
  (graph, report, whether anything changed). ``pass_(graph)`` is ``pass_.apply(graph).graph``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable

from .errors import OptionError
from .graph import Graph
from .ops.library import CompressedLayer
from .summary import Summary, summarize

# the Summary totals a pass may report as "before -> after" in its report's stats
_TOTALS = {"params": "total_params", "macs": "total_macs", "stored_bytes": "total_bytes"}


@dataclass
class PassReport:
    """What one pass changed: human-readable changes, layers left alone (with why), numbers."""

    pass_name: str
    changed: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    # the graph's summary before the pass ran and after it (filled by ``Pass.apply``)
    before: Summary | None = field(default=None, repr=False, compare=False)
    after: Summary | None = field(default=None, repr=False, compare=False)
    # why nothing changed, when nothing did (the pass is then left out of the graph's history)
    unchanged: str | None = None

    def change(self, what: str) -> None:
        self.changed.append(what)

    def skip(self, layer: str, reason: str) -> None:
        self.skipped.append((layer, reason))

    def to_dict(self) -> dict[str, Any]:
        return {"pass": self.pass_name, "changed": self.changed,
                "skipped": [{"layer": layer, "reason": r} for layer, r in self.skipped], "stats": self.stats,
                **({"unchanged": self.unchanged} if self.unchanged else {})}

    def __str__(self) -> str:
        lines = [f"[{self.pass_name}] {len(self.changed)} change(s), {len(self.skipped)} skipped"]
        lines += [f"  changed: {c}" for c in self.changed]
        lines += [f"  skipped: {layer} ({r})" for layer, r in self.skipped]
        lines += [f"  no change: {self.unchanged}"] if self.unchanged else []
        lines += [f"  {k}: {v}" for k, v in self.stats.items()]
        return "\n".join(lines)


@dataclass(frozen=True)
class PassResult:
    """What ``Pass.apply`` returns (as torch.fx's PassResult): the new graph, the pass's report,
    and whether the pass changed anything (it reported at least one change)."""

    graph: Graph
    report: PassReport
    changed: bool


@dataclass(frozen=True)
class Pass:
    """Base of all passes. Subclasses are ``@dataclass(frozen=True)`` and set ``name``.

    ``verify_tolerance`` is the max abs output change the pass promises on its example inputs
    (0.0 = exact rewrite); ``None`` means lossy — Pipeline verification then needs a tolerance
    from the user.
    """

    name: ClassVar[str] = "pass"
    verify_tolerance: ClassVar[float | None] = None
    # Summary totals recorded in the report's stats as "before -> after": "params", "macs", "stored_bytes"
    reported: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise OptionError for any bad option. Override and use the ``check_*`` helpers."""

    def requires(self, graph: Graph) -> None:
        """Check the input graph before anything is copied (as torch.fx's ``PassBase.requires``):
        raise OptionError/PassError if the pass cannot run on it. Default: no check."""

    def run(self, graph: Graph, report: PassReport) -> Graph:
        """Rewrite ``graph`` (already a private copy) and return it; ``apply`` recompiles it.
        ``report.before`` holds the graph's summary."""
        raise NotImplementedError(f"{type(self).__name__}.run")

    def ensures(self, before: Graph, after: Graph) -> None:
        """Check the result, recompiled with fresh shapes, against the untouched input (as
        torch.fx's ``PassBase.ensures``); raise PassError if broken. Default: no check."""

    def apply(self, graph: Graph) -> PassResult:
        """Run the pass on a copy of ``graph`` (left untouched): requires, run, one recompile,
        ensures, the before/after summary (``reported`` totals into the stats), history."""
        if not isinstance(graph, Graph):
            raise TypeError(f"{self.name}: expected a compiler.Graph (from compiler.trace), got {type(graph).__name__}")
        self.requires(graph)
        work = graph.copy()
        report = PassReport(self.name, before=summarize(work))
        out = self.run(work, report)
        out.recompile()
        self.ensures(graph, out)
        report.after = summarize(out)
        report.stats.update({key: f"{getattr(report.before, _TOTALS[key]):,} -> {getattr(report.after, _TOTALS[key]):,}"
                             for key in self.reported})
        if report.changed:
            out.history.append(self.spec())   # history and the manifest list what was applied
        else:
            report.unchanged = _why_unchanged(self.name, graph, report)
        out.reports.append(report)
        return PassResult(out, report, bool(report.changed))

    def __call__(self, graph: Graph) -> Graph:
        return self.apply(graph).graph

    def options(self) -> dict[str, Any]:
        """Options that make up the spec (fields marked ``metadata={"spec": False}`` — data, not
        settings — are left out)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("spec", True)}

    def spec(self) -> str:
        """Round-trips through ``compiler.parse_pass_spec``; options left at their defaults are
        omitted, so a spec reads like what the user wrote."""
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.default is not dataclasses.MISSING}
        opts = ",".join(f"{k}={_format_value(v)}" for k, v in self.options().items()
                        if k not in defaults or defaults[k] != v)
        return f"{self.name}:{opts}" if opts else self.name

    # ---- validation helpers ------------------------------------------------------------
    def _fail(self, option: str, value: Any, allowed: str) -> None:
        raise OptionError(f"{self.name}: option '{option}'={value!r} is invalid; allowed: {allowed}")

    def check_range(self, option: str, lo: float | None = None, hi: float | None = None, *,
                    lo_open: bool = False, hi_open: bool = False, integer: bool = False) -> None:
        value = getattr(self, option)
        kinds = (int,) if integer else (int, float)
        lo_s = "-inf" if lo is None else str(lo)
        hi_s = "inf" if hi is None else str(hi)
        allowed = f"{'(' if lo_open else '['}{lo_s}, {hi_s}{')' if hi_open else ']'}" + (" integer" if integer else "")
        if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
            self._fail(option, value, allowed)   # NaN compares false with every bound: refuse it first
        if lo is not None and (value < lo or (lo_open and value == lo)):
            self._fail(option, value, allowed)
        if hi is not None and (value > hi or (hi_open and value == hi)):
            self._fail(option, value, allowed)

    def check_pattern_tuples(self, *options: str) -> None:
        """Each of ``options`` (``layers``, ``exclude``) is a tuple of layer-name patterns."""
        for option in options:
            value = getattr(self, option)
            if not isinstance(value, tuple) or not all(isinstance(p, str) for p in value):
                self._fail(option, value, "a tuple of layer-name patterns")

    def check_patterns(self, graph: Graph, option: str, patterns: Iterable[str]) -> None:
        """Every layer-name pattern (fnmatch) must match a layer of ``graph``: a typo is an error
        naming the option, not a silent no-op."""
        names = sorted(n for n, _ in graph.module.named_modules() if n)
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                self._fail(option, pattern, f"a pattern matching layers of the model, e.g. one of {names[:8]}")

    def selects(self, name: str, report: PassReport) -> bool:
        """Whether the pass's ``layers`` / ``exclude`` name patterns (fnmatch) choose layer ``name``
        (no ``layers`` = every layer); a layer left out by ``exclude`` is reported as skipped."""
        layers, exclude = getattr(self, "layers", ()), getattr(self, "exclude", ())
        if layers and not any(fnmatch.fnmatchcase(name, p) for p in layers):
            return False
        if any(fnmatch.fnmatchcase(name, p) for p in exclude):
            report.skip(name, "excluded by the user")
            return False
        return True

    def check_choice(self, option: str, choices: Iterable[Any]) -> None:
        choices = list(choices)
        if getattr(self, option) not in choices:
            self._fail(option, getattr(self, option), f"one of {choices}")


def _why_unchanged(name: str, graph: Graph, report: PassReport) -> str:
    """The reason a pass changed nothing, for its report (a second ``sparsify`` after ``sparsify``
    or ``cluster`` finds only layers that are compressed already)."""
    compressed = [f"{n} ({type(m).__name__})" for n, m in graph.module.named_modules() if isinstance(m, CompressedLayer)]
    reasons = ["the layers it considered were skipped (reasons above)"] if report.skipped else []
    if compressed:
        shown = ", ".join(compressed[:6]) + (f" and {len(compressed) - 6} more" if len(compressed) > 6 else "")
        reasons.append(f"compressed already: {shown}")
    reasons = reasons or ["the model has no layer it rewrites"]
    return f"{'; '.join(reasons)}. {name} was not applied and is not recorded in the history"


def _format_value(v: Any) -> str:
    if isinstance(v, (tuple, list)):
        return "[" + ";".join(_format_value(x) for x in v) + "]"
    return str(v)
