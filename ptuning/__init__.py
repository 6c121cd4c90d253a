"""P-Tuning v2 for ChatGLM-6B."""

import logging
import sys
import warnings

# The filters below read torch from sys.modules: the records they see come from code that has imported it, and
# importing it here would make ``import ptuning`` take seconds before a command can answer Ctrl-C in one line.


def _drop_torchao_import_noise() -> None:
    """transformers imports torchao (our quantization backend) at start-up. torchao's wheel ships CUDA-only
    extension libraries whose failed loads on a CPU build of torch, and its registration of enums with
    torch's pytree, are logged as warnings on every start although nothing is wrong; drop those lines only."""

    def keep(record: logging.LogRecord) -> bool:
        # on a CUDA build a failed load is news
        text = str(record.msg)
        return not (
            (record.name == "torchao" and text.startswith("Failed to load") and sys.modules["torch"].version.cuda is None)
            or (record.name == "torch.utils._pytree" and "is an Enum subclass" in text)
        )

    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).addFilter(keep)


def _drop_known_noise() -> None:
    """Warnings that say nothing a user can act on, dropped by their exact text:

    * DeepSpeed (ZeRO) calls ``torch.distributed.all_gather_into_tensor`` / ``reduce_scatter_tensor``,
      which torch 2.13 deprecates with a FutureWarning on every call (about 3 per ZeRO-3 step);
    * DeepSpeed logs ``Setting accelerator to CPU ...`` to stdout in every process on a machine without a
      GPU, where CPU is the only choice;
    * peft's prefix tuning passes its virtual tokens as ``past_key_values=``, which our model takes under
      the name ``cache``: the rename's FutureWarning is ours and the caller (peft) cannot act on it;
    * ``get_peft_model`` reads transformers' deprecated ``is_gradient_checkpointing``.
    """
    warnings.filterwarnings(
        "ignore",
        message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
        category=FutureWarning,
    )
    warnings.filterwarnings(
        "ignore", message=r"`past_key_values` is deprecated .* for `ChatGLM[\w.]*`\. Use `cache` instead",
        category=FutureWarning,
    )
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)

    def keep(record: logging.LogRecord) -> bool:
        return not (str(record.msg).startswith("Setting accelerator to CPU")
                    and not sys.modules["torch"].cuda.is_available())

    logging.getLogger("DeepSpeed").addFilter(keep)


_drop_torchao_import_noise()
_drop_known_noise()
