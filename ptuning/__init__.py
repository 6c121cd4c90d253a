"""P-Tuning v2 for ChatGLM-6B."""

import logging


def _drop_torchao_import_noise() -> None:
    """transformers imports torchao (our quantization backend) at start-up. torchao's wheel ships CUDA-only
    extension libraries whose failed loads on a CPU build of torch, and its registration of enums with
    torch's pytree, are logged as warnings on every start although nothing is wrong; drop those lines only."""

    def keep(record: logging.LogRecord) -> bool:
        import torch  # already imported when these records come; on a CUDA build a failed load is news

        text = str(record.msg)
        return not (
            (record.name == "torchao" and text.startswith("Failed to load") and torch.version.cuda is None)
            or (record.name == "torch.utils._pytree" and "is an Enum subclass" in text)
        )

    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).addFilter(keep)


_drop_torchao_import_noise()
