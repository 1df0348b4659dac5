"""Token-id inputs of the text encoders: validation with errors that say what to pass."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def check_tokens(
    model: str, input_ids, attention_mask, *, max_length: int | None = None
) -> tuple[jax.Array, jax.Array | None]:
    """Validate ``input_ids [B, L]`` and ``attention_mask [B, L]``.

    Returns the ids and the key-padding mask as booleans ``[B, 1, 1, L]`` (or None).
    """
    ids = jnp.asarray(input_ids)
    if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(
            f"{model}: input_ids must be integer token ids of shape [B, L]; got shape "
            f"{tuple(ids.shape)} and dtype {ids.dtype}. Pass the tokenizer's ids as an int array "
            "(add a batch axis with ids[None] for one prompt)."
        )
    if max_length is not None and ids.shape[1] > max_length:
        raise ValueError(
            f"{model}: input_ids has {ids.shape[1]} tokens but the position table holds "
            f"max_position_embeddings={max_length}; truncate prompts to {max_length} tokens "
            f"(tokenizer(..., max_length={max_length}, truncation=True))."
        )
    if attention_mask is None:
        return ids, None
    mask = jnp.asarray(attention_mask)
    if mask.shape != ids.shape:
        raise ValueError(
            f"{model}: attention_mask must have the shape of input_ids {tuple(ids.shape)} "
            f"(1 = token, 0 = padding); got {tuple(mask.shape)}. Pass the attention_mask the "
            "tokenizer returned with these ids."
        )
    return ids, (mask != 0)[:, None, None, :]
