"""The one exception the converters raise for bad input (missing, corrupt or unsupported checkpoints)."""


class ConversionError(ValueError):
    pass
