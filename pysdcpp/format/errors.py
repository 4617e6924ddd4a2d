"""The exception for input that breaks a format contract (metadata, mask files, UNet configs)."""


class FormatError(ValueError):
    pass
