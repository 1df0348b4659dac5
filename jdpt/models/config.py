"""Model configurations: frozen dataclasses that read and write diffusers/transformers config.json.

A model's config is a frozen (hashable) dataclass whose field names are the reference library's
config keys, so ``config.json`` maps onto it one to one. Keys that the reference library writes
but that do not change the computation are listed in ``ignored_keys``; any other key we do not
model is reported with a warning rather than dropped silently.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any, ClassVar, Self

# Keys every transformers PretrainedConfig may carry that do not change an encoder's forward.
TRANSFORMERS_COMMON_KEYS = frozenset(
    {
        "architectures", "model_type", "transformers_version", "torch_dtype", "dtype",
        "bos_token_id", "pad_token_id", "decoder_start_token_id", "sep_token_id",
        "initializer_range", "initializer_factor", "use_cache", "return_dict",
        "output_hidden_states", "output_attentions", "tie_word_embeddings", "is_encoder_decoder",
        "is_decoder", "add_cross_attention", "chunk_size_feed_forward", "id2label", "label2id",
        "problem_type", "tokenizer_class", "prefix", "task_specific_params", "name_or_path",
        "finetuning_task", "cross_attention_hidden_size", "tf_legacy_loss", "use_bfloat16",
        "pruned_heads", "torchscript", "dropout", "attention_dropout", "dropout_rate",
        "classifier_dropout", "gradient_checkpointing",
    }
)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Base of every model config. Subclasses are frozen dataclasses."""

    reference_class: ClassVar[str] = ""  # diffusers `_class_name` or transformers architecture
    library: ClassVar[str] = "diffusers"  # "diffusers" or "transformers"
    model_type: ClassVar[str] = ""  # transformers `model_type`
    ignored_keys: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, source: str = "config") -> Self:
        """Build the config from a ``config.json`` dict; unknown keys are warned about."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: _freeze(v) for k, v in raw.items() if k in names}
        known = names | cls.ignored_keys
        if cls.library == "transformers":
            known = known | TRANSFORMERS_COMMON_KEYS
        unknown = sorted(k for k in raw if k not in known and not k.startswith("_"))
        if unknown:
            warnings.warn(
                f"{source}: {cls.reference_class} config keys not used by jdpt (check they keep "
                f"their defaults): {unknown}",
                stacklevel=3,
            )
        try:
            config = cls(**kwargs)
        except TypeError as e:
            raise ValueError(f"{source}: invalid {cls.reference_class} config: {e}") from None
        config.validate()
        return config

    def validate(self) -> None:
        """Raise ``ValueError`` naming the bad field and the fix; subclasses extend."""

    def to_dict(self) -> dict[str, Any]:
        """The config as the reference library writes it (``config.json`` content)."""
        out = {f.name: _thaw(getattr(self, f.name)) for f in dataclasses.fields(self)}
        if self.library == "diffusers":
            out = {"_class_name": self.reference_class, **out}
        else:
            out = {"architectures": [self.reference_class], "model_type": self.model_type, **out}
        return out


def _freeze(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, dict):
        raise TypeError(f"nested config dicts are not supported here: {v!r}")
    return v


def _thaw(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_thaw(x) for x in v]
    return v
