"""The stellarlm network: named-token embedding, a set encoder, and a query decoder.

A star is a *set* of observed tokens (name id i, normalised value v, normalised error s). Each
becomes ``f(w_i * v + u_i * s) + b_i`` (:class:`TokenEmbedding`): no positional encoding, the
name is the identity, so the order of the inputs cannot change any answer. The encoder is
self-attention over the observed tokens (a padding mask lets stars with different numbers of
tokens share a batch). Each requested name enters the decoder as its own learned query vector and
cross-attends to the encoded star; queries do not attend to each other, so the answer for
``teff`` is the same whichever other names are asked alongside it, and any number of names are
decoded in one batched pass. The head gives a mean and a log-variance per requested name.

After Leung & Bovy 2023 (arXiv:2308.10944). Configuration is a dataclass; the default is sized to
train on two CPU cores and grows by configuration alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


@dataclass
class ModelConfig:
    n_vocab: int = 322
    d_model: int = 96
    n_heads: int = 4
    n_encoder_layers: int = 3
    n_decoder_layers: int = 2
    mlp_ratio: int = 2
    dropout: float = 0.0
    logvar_min: float = -14.0  # normalised units: sigma >= ~1e-3 of a token's scale
    logvar_max: float = 6.0

    def to_dict(self) -> dict:
        return asdict(self)


class TokenEmbedding(nn.Module):
    """``f(w_i * v + u_i * s) + b_i`` for token id i, value v and error s (both normalised)."""

    def __init__(self, n_vocab: int, d: int):
        super().__init__()
        self.weight = nn.Embedding(n_vocab, d)  # w_i: how the value enters
        self.error_weight = nn.Embedding(n_vocab, d)  # u_i: how its uncertainty enters
        self.bias = nn.Embedding(n_vocab, d)  # b_i: the name's identity
        self.f = nn.Sequential(nn.GELU(), nn.Linear(d, d))
        nn.init.normal_(self.weight.weight, std=1.0)
        nn.init.normal_(self.error_weight.weight, std=0.1)
        nn.init.normal_(self.bias.weight, std=0.5)

    def forward(self, ids: torch.Tensor, values: torch.Tensor, errors: torch.Tensor) -> torch.Tensor:
        # values arrive in model units (Vocabulary.normalise: heavy tails already squashed);
        # errors span decades (bp_50 vs teff): a log keeps them on one scale
        s = torch.log(errors.clamp_min(1e-4)).unsqueeze(-1) / 4.0
        return self.f(self.weight(ids) * values.unsqueeze(-1) + self.error_weight(ids) * s) + self.bias(ids)


class Attention(nn.Module):
    def __init__(self, d: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.out = nn.Linear(d, d)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """x (B, Q, d) attends to context (B, K, d); key_mask (B, K) is True where a key exists."""
        q = rearrange(self.q(x), "b q (h e) -> b h q e", h=self.n_heads)
        k, v = rearrange(self.kv(context), "b k (two h e) -> two b h k e", two=2, h=self.n_heads)
        mask = rearrange(key_mask, "b k -> b 1 1 k")
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(rearrange(y, "b h q e -> b q (h e)"))


class MLP(nn.Sequential):
    def __init__(self, d: int, ratio: int, dropout: float):
        super().__init__(nn.Linear(d, ratio * d), nn.GELU(), nn.Linear(ratio * d, d), nn.Dropout(dropout))


class EncoderBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg.d_model, cfg.mlp_ratio, cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, mask)
        return x + self.mlp(self.norm2(x))


class DecoderBlock(EncoderBlock):
    """Same layers as an encoder block, but cross-attention only: a query sees the star, never the
    other queries."""

    def forward(self, q: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q = q + self.attn(self.norm1(q), memory, mask)
        return q + self.mlp(self.norm2(q))


class StellarTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = TokenEmbedding(cfg.n_vocab, cfg.d_model)
        self.query = nn.Embedding(cfg.n_vocab, cfg.d_model)
        self.encoder = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.n_encoder_layers))
        self.encoder_norm = nn.LayerNorm(cfg.d_model)
        self.decoder = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.n_decoder_layers))
        self.head = nn.Sequential(nn.LayerNorm(cfg.d_model), nn.Linear(cfg.d_model, 2))
        nn.init.normal_(self.query.weight, std=0.5)

    def encode(self, ids: torch.Tensor, values: torch.Tensor, errors: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
        """(B, N) observed tokens -> (B, N, d) context. ``mask`` is True for real (non-padding) tokens;
        padded slots may hold any id/value: they are masked out of attention."""
        x = self.embed(ids, values * mask, errors.masked_fill(~mask, 1.0))
        for block in self.encoder:
            x = block(x, mask)
        return self.encoder_norm(x)

    def decode(self, memory: torch.Tensor, mask: torch.Tensor, query_ids: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, Q) requested ids -> mean and log-variance (B, Q) in normalised units."""
        q = self.query(query_ids)
        for block in self.decoder:
            q = block(q, memory, mask)
        mean, logvar = self.head(q).unbind(-1)
        return mean, logvar.clamp(self.cfg.logvar_min, self.cfg.logvar_max)

    def forward(self, ids, values, errors, mask, query_ids):
        return self.decode(self.encode(ids, values, errors, mask), mask, query_ids)

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def gaussian_nll(mean: torch.Tensor, logvar: torch.Tensor, target: torch.Tensor, target_err: torch.Tensor,
                 mask: torch.Tensor) -> torch.Tensor:
    """Mean Gaussian negative log-likelihood over ``mask``, with the target's own measurement
    variance added to the predicted one: the model learns the intrinsic scatter only."""
    var = logvar.exp() + target_err.square()
    nll = 0.5 * (torch.log(var) + (target - mean).square() / var)
    return (nll * mask).sum() / mask.sum().clamp_min(1)
