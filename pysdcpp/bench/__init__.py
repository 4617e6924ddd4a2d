"""Benchmarks: commands that print tables and write JSON (never timed assertions); one module per benchmark, this
package re-exports their public names."""

from .batch import batch_bench, format_batch_table, parse_splits
from .attention import AttentionShape, attention_bench, format_attention_table, sd_attention_shapes
from .experts import expert_bench, format_expert_table
from .layers import LAYER_ALGORITHMS, ConvShape, LayerResult, format_layer_table, layer_bench, conv_shapes
from .linear import format_linear_table, linear_bench, sd15_linear_shapes
from .machine import machine_info
from .model import VARIANTS, format_model_table, model_bench, parse_variant, psnr, run_variant, summarize
from .plot import plot_report

__all__ = ["batch_bench", "format_batch_table", "parse_splits",
           "AttentionShape", "attention_bench", "format_attention_table", "sd_attention_shapes",
           "expert_bench", "format_expert_table",
           "LAYER_ALGORITHMS", "ConvShape", "LayerResult", "format_layer_table", "layer_bench", "conv_shapes",
           "format_linear_table", "linear_bench", "sd15_linear_shapes",
           "machine_info",
           "VARIANTS", "format_model_table", "model_bench", "parse_variant", "psnr", "run_variant", "summarize",
           "plot_report"]
