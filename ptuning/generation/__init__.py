"""A decode loop of our own for evaluation, chat and the server: a static slot cache, prefill then one tight
forward per token, sampling and stop handling on the side (:mod:`.cache`, :mod:`.sampling`, :mod:`.loop`), the
cache's memory checked before it is allocated (:mod:`.memory`), and answer text as ids arrive
(:mod:`.detokenize`)."""

from .cache import SlotCache
from .detokenize import Detokenizer
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
    refuse_cuda_graphs,
    run_to_end,
    stream,
    vocab_limit,
)
from .memory import CacheMemoryError, CacheShape, available_bytes
from .sampling import Sampling, choose_tokens, draw_tokens, top_p_probabilities

__all__ = [
    "ERROR",
    "CacheMemoryError",
    "CacheShape",
    "Detokenizer",
    "LENGTH",
    "STOP",
    "Decoder",
    "DecoderFull",
    "PrefixTable",
    "Request",
    "Sampling",
    "SlotCache",
    "StepOutput",
    "available_bytes",
    "choose_tokens",
    "compute_dtype",
    "default_cache_dtype",
    "draw_tokens",
    "model_prefix",
    "packed_linears",
    "packing_available",
    "refuse_cuda_graphs",
    "run_to_end",
    "stream",
    "top_p_probabilities",
    "vocab_limit",
]
