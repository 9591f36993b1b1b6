"""Exceptions Squeezer raises on purpose: each names the node, layer, pass, option or file at fault.

Imports nothing: codegen's torch-free loader uses these too."""


class SqueezerError(Exception):
    """Base class of every error Squeezer raises deliberately."""


class TraceError(SqueezerError):
    """A model could not be captured by torch.fx."""


class ModelRunError(TraceError):
    """The model failed when run on its example inputs (shape propagation): the message names the
    node, its module or function, and torch's own message; the torch exception is chained."""


class OptionError(SqueezerError, ValueError):
    """A pass (or CLI) option is outside its allowed range or of the wrong type."""


class PassError(SqueezerError):
    """A pass failed; the message names the pass and the passes that ran before it."""


class VerificationError(PassError):
    """A pass changed the model's outputs by more than its stated tolerance."""


class BuildError(SqueezerError):
    """torch.export or the TVM import/compile could not handle the graph."""


class BuildOptionError(OptionError, BuildError):
    """A build option (target, kernel choice, schedules) is invalid: an OptionError, and a
    BuildError for callers that catch what ``codegen.build`` raised before options were checked
    in one place."""


class InputError(SqueezerError, ValueError):
    """Inputs given to a compiled module do not match what it was compiled for."""


class ArtifactError(SqueezerError):
    """An exported module directory (or a file of ``compiler.save``) is missing a file, corrupt,
    mismatched, or holds something that cannot be saved or loaded safely."""


def last_line(exc: BaseException) -> str:
    """The message of a TVM error: its last line (the lines above are TVM's own traceback); ''
    when the error has no message."""
    text = str(exc).strip()
    return text.splitlines()[-1] if text else ""
