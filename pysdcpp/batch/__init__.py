"""Batch generation over prompt sets (`pysdcpp batch`): resumable, on local worker processes or Ray actors."""

from .driver import BatchError, BatchSummary, run_batch
from .jobs import RunConfig, make_jobs, read_prompt_file
from .outputs import MANIFEST, OutputFolder

__all__ = ["BatchError", "BatchSummary", "MANIFEST", "OutputFolder", "RunConfig", "make_jobs", "read_prompt_file",
           "run_batch"]
