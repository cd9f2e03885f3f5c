"""``UnslothSFTConfig``: TRL's ``SFTConfig`` plus the plugin's own fields.

Importing this module imports TRL; ``unsloth_patch`` exposes the class lazily so that
``import unsloth_patch`` stays free of TRL. It is an ordinary dataclass subclass, so it works
with ``HfArgumentParser`` and command lines (``--embedding_learning_rate 5e-6``) and pickles
into ``training_args.bin`` like any training config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from trl.trainer.sft_config import SFTConfig

from .patches.embedding_lr import FIELD_HELP, validate

__all__ = ["UnslothSFTConfig"]


@dataclass
class UnslothSFTConfig(SFTConfig):
    """TRL's ``SFTConfig`` with ``embedding_learning_rate``.

    embedding_learning_rate (`float`, *optional*):
        Learning rate of the input and output embeddings (``embed_tokens``, ``lm_head`` and
        PEFT's trainable copies of them). ``None`` (the default) leaves every parameter at
        ``learning_rate``, unless ``UNSLOTH_PATCH_EMBEDDING_LR`` is set.
    """

    embedding_learning_rate: Optional[float] = field(default=None, metadata={"help": FIELD_HELP})

    def __post_init__(self):
        if self.embedding_learning_rate is not None:
            self.embedding_learning_rate = validate(
                self.embedding_learning_rate, f"{type(self).__name__}(embedding_learning_rate=...)"
            )
        super().__post_init__()
