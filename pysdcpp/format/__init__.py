"""The format layer: facts the converters and the runtime share (GGUF metadata keys, model families, the UNet's
layout and its ALTER units, routing metadata, MAC counts). It imports neither side; both import it."""
