"""nn.MultiheadAttention as separate Linears, so width pruning can cut its heads.

nn.MultiheadAttention keeps q, k and v in one packed parameter (``in_proj_weight``) and calls its output
projection's weight directly, never the Linear module, so no Linear of it runs as a module and nothing can
be hooked or sliced; its inner width must also equal the embedding width. ``SplitAttention`` computes the
same function with ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj`` Linears and any number of heads, with
the same call signature and return value, so a model calling ``attn(x, x, x, key_padding_mask=...,
need_weights=False)`` (nn.TransformerEncoderLayer, a user's own block) runs unchanged. Its ``head_dim`` and
``num_heads`` make it the separate q/k/v layout compressor/groups.py already cuts.

It has no packed projection, so nn.TransformerEncoderLayer takes its plain path (the fused fast path needs
``in_proj_bias``), as the exported ONNX graph does anyway.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .surgery import get_module, set_module


class SplitAttention(nn.Module):
    """nn.MultiheadAttention's function with q, k, v and output projections as four Linears (any head count)."""

    in_proj_weight = None  # no packed projection: nn.TransformerEncoderLayer's fast-path checks read these
    in_proj_bias = None
    _qkv_same_embed_dim = False

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, kdim: int | None = None,
                 vdim: int | None = None, bias: bool = True, dropout: float = 0.0, batch_first: bool = False):
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.dropout, self.batch_first = dropout, batch_first
        inner = num_heads * head_dim
        self.q_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.k_proj = nn.Linear(kdim or embed_dim, inner, bias=bias)
        self.v_proj = nn.Linear(vdim or embed_dim, inner, bias=bias)
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias)

    @classmethod
    def of(cls, mha: nn.MultiheadAttention) -> SplitAttention:
        """The same attention with ``mha``'s weights (refused where nn.MultiheadAttention adds what this has not)."""
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("nn.MultiheadAttention with add_bias_kv or add_zero_attn")
        bias = mha.in_proj_bias is not None
        new = cls(mha.embed_dim, mha.num_heads, mha.head_dim, mha.kdim, mha.vdim, bias, mha.dropout, mha.batch_first)
        w = (mha.in_proj_weight.chunk(3) if mha._qkv_same_embed_dim
             else (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight))
        b = mha.in_proj_bias.chunk(3) if bias else (None,) * 3
        with torch.no_grad():
            for lin, wi, bi in zip((new.q_proj, new.k_proj, new.v_proj), w, b):
                lin.weight.copy_(wi)
                if bi is not None:
                    lin.bias.copy_(bi)
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if bias:
                new.out_proj.bias.copy_(mha.out_proj.bias)
        return new.to(mha.out_proj.weight.device, mha.out_proj.weight.dtype).train(mha.training)

    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = True, attn_mask=None,
                average_attn_weights: bool = True, is_causal: bool = False):
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        if not self.batch_first or unbatched:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        b, n, s = query.shape[0], query.shape[1], key.shape[1]
        q = self.q_proj(query).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(key).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(value).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        if is_causal and attn_mask is None:  # a hint nn.MultiheadAttention wants the mask with; made here
            attn_mask = torch.ones(n, s, dtype=torch.bool, device=q.device).triu(1)
        mask = _additive(attn_mask, q.dtype)
        if mask is not None and mask.dim() == 3:  # (batch * heads, n, s)
            mask = mask.view(b, -1, n, s)
        if key_padding_mask is not None:
            pad = _additive(key_padding_mask, q.dtype).view(b, 1, 1, s)
            mask = pad if mask is None else mask + pad
        p = self.dropout if self.training else 0.0
        if need_weights:
            a = (q @ k.transpose(-2, -1)) * self.head_dim ** -0.5
            a = torch.softmax(a if mask is None else a + mask, dim=-1)
            out = F.dropout(a, p) @ v
            weights = a.mean(1) if average_attn_weights else a
        else:
            out, weights = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p), None
        out = self.out_proj(out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))
        if not self.batch_first or unbatched:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(1)
            weights = None if weights is None else weights.squeeze(0)
        return out, weights


def _additive(mask, dtype):
    """nn.MultiheadAttention's mask as one to add: True (masked out) is -inf, a float mask is added as it is."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def split_attention(model: nn.Module, paths=None) -> list[str]:
    """Replace ``model``'s nn.MultiheadAttention modules (those at ``paths``; all by default) by SplitAttention
    in place; return the paths replaced. An nn.TransformerEncoder holding one stops making nested tensors,
    which only the fused path reads."""
    found = [p for p, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)
             and (paths is None or p in paths) and m.bias_k is None and not m.add_zero_attn]
    for p in found:
        set_module(model, p, SplitAttention.of(get_module(model, p)))
    for p, m in model.named_modules():
        if isinstance(m, nn.TransformerEncoder) and any(f.startswith(f"{p}." if p else "") for f in found):
            m.use_nested_tensor = False
    return found
