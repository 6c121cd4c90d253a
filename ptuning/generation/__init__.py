"""A decode loop of our own for evaluation, chat and the server: a static slot cache, prefill then one tight
forward per token, sampling and stop handling on the side (:mod:`.cache`, :mod:`.sampling`, :mod:`.loop`)."""

from .cache import SlotCache
from .kernels import packed_linears, packing_available
from .loop import (
    ERROR,
    LENGTH,
    STOP,
    Decoder,
    DecoderFull,
    PrefixTable,
    Request,
    StepOutput,
    compute_dtype,
    default_cache_dtype,
    model_prefix,
    run_to_end,
    stream,
)
from .sampling import Sampling, choose_tokens, top_p_probabilities

__all__ = [
    "ERROR",
    "LENGTH",
    "STOP",
    "Decoder",
    "DecoderFull",
    "PrefixTable",
    "Request",
    "Sampling",
    "SlotCache",
    "StepOutput",
    "choose_tokens",
    "compute_dtype",
    "default_cache_dtype",
    "model_prefix",
    "packed_linears",
    "packing_available",
    "run_to_end",
    "stream",
    "top_p_probabilities",
]
