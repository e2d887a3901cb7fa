"""The transformer blocks of the ``open_clip`` backbone run by hand:
:func:`_run_blocks` runs a tower's blocks with a prompt method's ``block_hook``
before each (checked against its contract), and the shared-prefix text pass
(:func:`_shares_prefixes` tells whether a text tower allows it; :func:`_prefix_block`
and :func:`_suffix_block` redo one ``ResidualAttentionBlock`` so that a prompt
prefix's keys and values are computed once and read by every class's suffix).
While a projection hook is active (:meth:`~vlprompt_core.api.VisionLanguageBackbone.adapted`)
every block is run by hand (:func:`_adapted_block`, and the prefix and suffix blocks), with
q, k and v split from the packed input projection and each projection's output passed
through the hook (:func:`_qkv`, :func:`_out`); without one, the fast paths are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...api import BlockContext, ContractError, ProjectionSite, call_block_hook


def _hooked(block_hook, i: int, x, context: BlockContext, keep_length: bool):
    """``x`` after ``block_hook`` before block ``i``, checked against its contract."""
    before = x.shape
    out = call_block_hook(block_hook, i, x, context)
    tower = context.tower
    if not isinstance(out, torch.Tensor) or out.dim() != 3:
        raise ContractError(f"{tower} block_hook before block {i} must return a [N, L, W] tensor")
    if keep_length and out.shape != before:
        raise ContractError(
            f"{tower} block_hook before block {i} changed the tokens from {list(before)} to {list(out.shape)}; "
            "text prompts must replace token states, not insert or remove tokens (pooling reads the "
            "positions from the token ids)"
        )
    if out.shape[0] != before[0] or out.shape[2] != before[2]:
        raise ContractError(
            f"{tower} block_hook before block {i} changed the batch size or width from {list(before)} "
            f"to {list(out.shape)}; only the number of tokens may change"
        )
    if getattr(block_hook, "slots_only", False) and context.slots is not None:
        with torch.no_grad():
            kept = (context.slots < 0).unsqueeze(-1)
            same = torch.allclose(torch.where(kept, out, 0), torch.where(kept, x, 0), rtol=0, atol=0, equal_nan=True)
        if not same:
            raise ContractError(f"{tower} block_hook before block {i} is slots_only but changed a token that is "
                                "not a context slot")
    return out


def _run_blocks(transformer, x, mask, block_hook, context: BlockContext, keep_length: bool, projection_hook=None):
    """The blocks of one tower, with ``block_hook`` before each, checked against its contract;
    with a ``projection_hook``, each block by hand (:func:`_adapted_block`)."""
    batch_first = getattr(transformer, "batch_first", True)
    for i, block in enumerate(transformer.resblocks):
        if block_hook is not None:
            x = _hooked(block_hook, i, x, context, keep_length)
        if projection_hook is not None:
            x = _adapted_block(block, x, mask, projection_hook, context.tower, i)
            continue
        if not batch_first:
            x = x.transpose(0, 1)
        x = block(x, attn_mask=mask)
        if not batch_first:
            x = x.transpose(0, 1)
    return x


def _plain_blocks(transformer) -> bool:
    """Whether every block of a tower is open_clip's plain ``ResidualAttentionBlock``
    (self-attention through ``nn.MultiheadAttention``'s packed projection, no extra keys),
    which :func:`_adapted_block`, :func:`_prefix_block` and :func:`_suffix_block` redo by hand."""
    from open_clip.transformer import ResidualAttentionBlock

    for block in transformer.resblocks:
        if type(block) is not ResidualAttentionBlock or hasattr(block, "ln_1_kv"):
            return False
        attn = block.attn
        if attn.in_proj_weight is None or attn.bias_k is not None or attn.add_zero_attn:
            return False
    return True


def _projected(hook, site: ProjectionSite, x, y):
    """``hook(site, x, y)``, checked: a tensor of ``y``'s shape, in ``y``'s dtype."""
    out = hook(site, x, y)
    if not isinstance(out, torch.Tensor) or out.shape != y.shape:
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ContractError(f"projection hook at {site.tower} block {site.layer} {site.projection} must return a "
                            f"tensor of the projection's shape {list(y.shape)}, got {got}")
    return out.to(y.dtype)


def _qkv(attn, h, hook, tower: str, layer: int):
    """The packed projection ``[..., 3W]`` of the normed tokens ``h``: q, k and v each through
    ``hook`` when one is active (split from ``in_proj``, the block's own weights)."""
    qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)
    if hook is None:
        return qkv
    parts = qkv.chunk(3, dim=-1)
    return torch.cat([_projected(hook, ProjectionSite(tower, layer, name), h, y)
                      for name, y in zip(("q", "k", "v"), parts)], dim=-1)


def _out(attn, o, hook, tower: str, layer: int):
    """The output projection of the merged heads ``o``, through ``hook`` when one is active."""
    y = attn.out_proj(o)
    return y if hook is None else _projected(hook, ProjectionSite(tower, layer, "out"), o, y)


def _adapted_block(block, x, mask, hook, tower: str, layer: int):
    """One ``ResidualAttentionBlock`` on ``x`` ``[N, L, W]`` (batch first; additive ``mask``
    ``[L, L]`` or None) by hand, every attention projection through ``hook``."""
    attn = block.attn
    n, length, width = x.shape
    heads = attn.num_heads
    qkv = _qkv(attn, block.ln_1(x), hook, tower, layer)
    q, k, v = qkv.unflatten(-1, (3, heads, width // heads)).permute(2, 0, 3, 1, 4)  # each [N, H, L, d]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask.to(q.dtype))
    x = x + block.ls_1(_out(attn, out.transpose(1, 2).reshape(n, length, width), hook, tower, layer))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _shares_prefixes(text, pool_type: str) -> bool:
    """Whether a text tower allows :meth:`OpenClipBackbone.encode_text_prefix`: a causal
    mask, pooling at a token (``argmax``/``eos``: the end token, after any shared
    prefix), and blocks that are open_clip's plain ``ResidualAttentionBlock`` (self-
    attention through ``nn.MultiheadAttention``'s packed projection, which
    :func:`_suffix_block` redoes by hand)."""
    mask = text.attn_mask
    if mask is None or pool_type not in ("argmax", "eos"):
        return False
    causal = torch.full(mask.shape, float("-inf")).triu(1)
    if not torch.equal(mask.detach().float().cpu(), causal):
        return False
    return _plain_blocks(text.transformer)


def _prefix_block(block, x, mask, hook=None, layer: int = 0):
    """One ``ResidualAttentionBlock`` on prefix tokens ``x`` ``[G, P, W]`` (causal ``mask``
    ``[P, P]``), by hand so that its keys and values ``[G, heads, P, head_dim]``, kept
    for the suffixes, come from the one projection the block itself uses (through the
    projection ``hook`` of text block ``layer`` when one is active)."""
    attn = block.attn
    groups, length, width = x.shape
    heads = attn.num_heads
    qkv = _qkv(attn, block.ln_1(x), hook, "text", layer)  # [G, P, 3W]
    q, keys, values = qkv.unflatten(-1, (3, heads, width // heads)).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask.to(q.dtype))
    x = x + block.ls_1(_out(attn, out.transpose(1, 2).reshape(groups, length, width), hook, "text", layer))
    return x + block.ls_2(block.mlp(block.ln_2(x))), keys, values


def _suffix_block(block, x, keys, values, mask, hook=None, layer: int = 0):
    """One ``ResidualAttentionBlock`` on suffix tokens ``x`` ``[G, C, S, W]`` whose prompts
    begin with the prefix of ``keys``/``values`` ``[G, H, P, d]``; ``mask`` ``[S, P + S]`` is
    the additive causal mask of the suffix rows.

    Scores against the prefix are one matmul per (group, head) with the classes folded
    into the query rows, so the prefix keys and values are read, not copied, per class;
    one softmax covers prefix and suffix columns, as the full pass's attention does.
    Projections through ``hook`` (text block ``layer``) when one is active.
    """
    attn = block.attn
    groups, n_cls, length, width = x.shape
    heads = attn.num_heads
    n_prefix, head_dim = keys.shape[2], width // heads
    qkv = _qkv(attn, block.ln_1(x), hook, "text", layer)  # [G, C, S, 3W]
    q, k, v = qkv.unflatten(-1, (3, heads, head_dim)).permute(3, 0, 4, 1, 2, 5)  # each [G, H, C, S, d]
    q = q * head_dim**-0.5
    to_prefix = q.reshape(groups, heads, n_cls * length, head_dim) @ keys.transpose(-1, -2)
    scores = torch.cat([to_prefix.view(groups, heads, n_cls, length, n_prefix), q @ k.transpose(-1, -2)], dim=-1)
    probs = torch.softmax(scores + mask.to(scores.dtype), dim=-1)  # [G, H, C, S, P + S]
    from_prefix = probs[..., :n_prefix].reshape(groups, heads, n_cls * length, n_prefix) @ values
    out = from_prefix.view(groups, heads, n_cls, length, head_dim) + probs[..., n_prefix:] @ v
    out = out.permute(0, 2, 3, 1, 4).reshape(groups, n_cls, length, width)
    x = x + block.ls_1(_out(attn, out, hook, "text", layer))
    return x + block.ls_2(block.mlp(block.ln_2(x)))
