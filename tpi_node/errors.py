"""The one exception tree of tpi-node.

    TpiError                 everything tpi-node raises on purpose
      UserError              bad input or an impossible request: the CLI prints one line, exit 2
        PlanError, PrepareError, ...   (defined where they are raised, subclassing these)

Layers add their own subclasses (FrameError, PeerLost, EngineError, ...); code that must not
crash on a peer's or a user's mistake catches TpiError, never a bare Exception.
"""


class TpiError(Exception):
    """Root of every error tpi-node raises on purpose."""


class UserError(TpiError):
    """Bad input or an impossible request: a flag, a model name, a budget that cannot work."""
