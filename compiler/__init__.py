"""Squeezer's core: trace a model into a Graph, run passes on it, summarize it.

Nothing here imports ``passes`` or ``codegen`` at import time (see DESIGN.md's floors)."""

from .errors import (ArtifactError, BuildError, OptionError, PassError, SqueezerError, TraceError,
                     VerificationError)
from .graph import Graph
from .pass_infra import Pass, PassReport
from .pipeline import DumpIR, Instrument, Pipeline, Timing, Verify
from .registry import get_pass, load_recipe, parse_pass_spec, register_pass, registered_passes
from .summary import Summary, summarize
from .tracing import trace

__version__ = "0.1.0"

__all__ = ["ArtifactError", "BuildError", "OptionError", "PassError", "SqueezerError", "TraceError",
           "VerificationError", "Graph", "Pass", "PassReport", "Pipeline", "Instrument", "Timing", "DumpIR",
           "Verify", "get_pass", "load_recipe", "parse_pass_spec", "register_pass", "registered_passes",
           "Summary", "summarize", "trace", "__version__"]
