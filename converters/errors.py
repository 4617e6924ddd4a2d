"""The exception the converters raise for bad input (missing, corrupt or unsupported checkpoints): the format
layer's FormatError, under the name converter code and its callers know."""

from pysdcpp.format.errors import FormatError

ConversionError = FormatError
