"""GGUF metadata keys pysdcpp writes and reads: one place, so writers and readers cannot drift apart.

stable-diffusion.cpp ignores metadata; these keys are for pysdcpp (and other runtimes) only.
"""

ARCHITECTURE = "stable-diffusion"      # value of general.architecture
FAMILY = "pysdcpp.model.family"        # "sd1" | "sd2"
PREDICTION = "pysdcpp.model.prediction"  # "eps" | "v"; absent: let the runtime decide
SOURCE = "pysdcpp.convert.source"      # what the file was converted from
SOURCE_LAYOUT = "pysdcpp.convert.layout"  # "diffusers-folder" | "ldm-file" | "diffusers-file"
OUTPUT_TYPE = "pysdcpp.convert.type"   # f32 | f16 | q8_0 | q4_0 ...
CONVERTER_VERSION = "pysdcpp.convert.version"
SYNTHETIC = "pysdcpp.model.synthetic"  # true for the random-weight demo / test models
