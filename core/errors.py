"""Errors raised before any training starts, each naming the problem and the fix."""


class SwapConfigError(ValueError):
    """A swap configuration, class selection or model does not fit together."""


class CheckpointMismatchError(SwapConfigError):
    """A checkpoint does not match the model it is loaded into."""
