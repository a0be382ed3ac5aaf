"""The stellarlm network: named-token embedding, a set encoder, and a query decoder.

A star is a *set* of observed tokens (name id i, normalised value v, normalised error s). Each
becomes ``f(w_i * v + u_i * s + c_i) + b_i`` (:class:`TokenEmbedding`): no positional encoding,
the name is the identity, so the order of the inputs cannot change any answer. The encoder is
self-attention over the observed tokens (a padding mask lets stars with different numbers of
tokens share a batch). Each requested name enters the decoder as its own learned query vector and
cross-attends to the encoded star; queries do not attend to each other, so the answer for
``teff`` is the same whichever other names are asked alongside it, and any number of names are
decoded in one batched pass. The head gives, per requested name, a mixture of ``n_components``
Gaussians (weights, means, log-variances); with one component, a mean and a log-variance. A
mixture lets the answer be two-valued where the data are: an XP spectrum that fits a reddened B
star as well as an F star, or a 5,000 K star that is a red-clump giant or a dwarf.

Spectra are long (114 XP flux bins, 200 LAMOST-like bins) and attention cost grows with the
number of tokens, so neighbouring tokens of a spectrum may share a *patch* (``patch_of``): the
embeddings of a patch's observed tokens are summed into one encoder token. Each summand still
carries its own name, a missing token simply adds nothing, and a sum does not depend on order, so
the input remains a set of named tokens; the encoder sees ~25 patches instead of ~120 tokens for
an XP spectrum, which is what makes training on two CPU cores practical.

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
    # Gaussians per answer: 1 is a plain mean and variance; more let the predictive distribution
    # have several modes (see gaussian_nll)
    n_components: int = 2
    # a learned offset inside the nonlinearity, f(w_i * v + c_i + ...): without it every feature
    # of a token bends at v = 0, so a value enters as little more than two linear pieces
    value_offset: bool = True
    # patch id of each token id (see Vocabulary.patches), or None: every token attends on its own
    patch_of: list[int] | None = None
    # a learned stem over each whole spectrum (SpectrumStem): the spectrum (0, 1, ...) each token
    # id belongs to, or -1; None: no stem. Each spectrum that a star has adds ``stem_tokens``
    # encoder tokens, computed from all of its observed bins at once
    stem_of: list[int] | None = None
    stem_tokens: int = 0
    stem_hidden: int = 256
    # a projection head for the star embedding (StellarTransformer.embed_vectors): the mean of the
    # encoded tokens through LayerNorm, Linear, GELU, Linear to ``align_dim`` numbers; 0: no head,
    # the embedding is the mean itself (d_model numbers). The contrastive alignment term of
    # training (stellarlm.alignment, TrainConfig.align_weight) is what trains the head
    align_dim: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


class TokenEmbedding(nn.Module):
    """``f(w_i * v + u_i * s + c_i) + b_i`` for token id i, value v and error s (both normalised),
    with ``f = Linear(GELU(.))`` and ``c_i`` the learned offset (``value_offset``).
    ``forward(..., patch, n_patches)`` returns the sum over each patch's tokens: the Linear is
    applied once to the summed GELU features (the same up to its bias, which is counted once per
    patch instead of once per token), which is what makes long spectra cheap."""

    def __init__(self, n_vocab: int, d: int, value_offset: bool = True):
        super().__init__()
        self.weight = nn.Embedding(n_vocab, d)  # w_i: how the value enters
        self.error_weight = nn.Embedding(n_vocab, d)  # u_i: how its uncertainty enters
        self.bias = nn.Embedding(n_vocab, d)  # b_i: the name's identity
        self.offset = nn.Embedding(n_vocab, d) if value_offset else None  # c_i: where each feature bends
        self.out = nn.Linear(d, d)
        nn.init.normal_(self.weight.weight, std=1.0)
        nn.init.normal_(self.error_weight.weight, std=0.1)
        nn.init.normal_(self.bias.weight, std=0.5)
        if self.offset is not None:
            nn.init.normal_(self.offset.weight, std=1.0)

    def forward(self, ids: torch.Tensor, values: torch.Tensor, errors: torch.Tensor, mask: torch.Tensor,
                patch: torch.Tensor, n_patches: int) -> torch.Tensor:
        """(B, N) tokens -> (B, n_patches, d): the summed embeddings of each patch's tokens where
        ``mask`` is True (a patch with no token is all zeros)."""
        # values arrive in model units (Vocabulary.normalise: heavy tails already squashed);
        # errors span decades (bp_50 vs teff): a log keeps them on one scale
        s = torch.log(errors.clamp_min(1e-4)).unsqueeze(-1) / 4.0
        pre = self.weight(ids) * values.unsqueeze(-1) + self.error_weight(ids) * s
        h = F.gelu(pre if self.offset is None else pre + self.offset(ids))
        keep = mask.unsqueeze(-1).to(h.dtype)
        b, _, d = h.shape
        index = patch.unsqueeze(-1).expand(-1, -1, d)
        summed_h = h.new_zeros(b, n_patches, d).scatter_add_(1, index, h * keep)
        summed_b = h.new_zeros(b, n_patches, d).scatter_add_(1, index, self.bias(ids) * keep)
        return self.out(summed_h) + summed_b


class SpectrumStem(nn.Module):
    """A whole spectrum read at once: ``MLP(sum_i (w_i v_i + u_i s_i + p_i))`` over the observed
    bins i of each spectrum, giving ``n_tokens`` encoder tokens per spectrum.

    Patches see only neighbouring bins, and attention mixes patches by weighted averages, so a
    difference between distant bins (a colour, the depth of a band against its continuum) takes
    depth to form. A first layer that is linear in all the bins at once forms it directly, as the
    first layer of a task-specific MLP does. It is still a function of a set of named tokens: each
    term carries its bin's own weights, a missing bin adds nothing (and ``p_i``, its presence, says
    so), and a sum does not depend on order."""

    def __init__(self, n_vocab: int, stem_of: list[int], d: int, hidden: int, n_tokens: int):
        super().__init__()
        stem_of = torch.as_tensor(stem_of)
        self.n_stems = int(stem_of.max()) + 1
        self.n_tokens = n_tokens
        self.register_buffer("stem_of", stem_of, persistent=False)
        scale = 1.0 / max(1, int((stem_of >= 0).sum()) // max(self.n_stems, 1)) ** 0.5
        self.value = nn.Parameter(torch.randn(n_vocab, hidden) * scale)
        self.error = nn.Parameter(torch.randn(n_vocab, hidden) * 0.1 * scale)
        self.presence = nn.Parameter(torch.randn(n_vocab, hidden) * scale)
        self.mlp = nn.ModuleList(nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.GELU(),
                                               nn.Linear(hidden, n_tokens * d)) for _ in range(self.n_stems))

    def forward(self, ids: torch.Tensor, values: torch.Tensor, errors: torch.Tensor, mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N) tokens -> (B, n_stems * n_tokens, d) stem tokens and their (B, n_stems * n_tokens)
        mask: a spectrum with no observed bin gives no token."""
        # the sums are products of dense (B, n_vocab) rows with the (n_vocab, hidden) tables: much
        # cheaper, forward and backward, than gathering a (B, N, hidden) table per star
        b, n_vocab = ids.shape[0], self.value.shape[0]
        use = (mask & (self.stem_of[ids] >= 0)).to(values.dtype)
        s = torch.log(errors.clamp_min(1e-4)) / 4.0

        def dense(x):
            return x.new_zeros(b, n_vocab).scatter_add_(1, ids, x * use)

        v, e, p = dense(values), dense(s), dense(torch.ones_like(values))
        tokens, present = [], []
        for k, mlp in enumerate(self.mlp):
            cols = self.stem_of == k
            summed = v[:, cols] @ self.value[cols] + e[:, cols] @ self.error[cols] + p[:, cols] @ self.presence[cols]
            tokens.append(mlp(summed))
            present.append(p[:, cols].sum(1) > 0)
        out = rearrange(torch.stack(tokens, 1), "b s (t d) -> b (s t) d", t=self.n_tokens)
        return out, torch.stack(present, 1).repeat_interleave(self.n_tokens, dim=1)


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
        self.embed = TokenEmbedding(cfg.n_vocab, cfg.d_model, cfg.value_offset)
        self.query = nn.Embedding(cfg.n_vocab, cfg.d_model)
        self.stem = (None if cfg.stem_tokens < 1 or cfg.stem_of is None or max(cfg.stem_of) < 0 else
                     SpectrumStem(cfg.n_vocab, cfg.stem_of, cfg.d_model, cfg.stem_hidden, cfg.stem_tokens))
        self.encoder = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.n_encoder_layers))
        self.encoder_norm = nn.LayerNorm(cfg.d_model)
        self.decoder = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.n_decoder_layers))
        if cfg.n_components < 1:
            raise ValueError(f"n_components must be at least 1, not {cfg.n_components}")
        # per component a mean and a log-variance, and with several a weight's logit
        n_out = 2 if cfg.n_components == 1 else 3 * cfg.n_components
        self.head = nn.Sequential(nn.LayerNorm(cfg.d_model), nn.Linear(cfg.d_model, n_out))
        nn.init.normal_(self.query.weight, std=0.5)
        patch_of = torch.arange(cfg.n_vocab) if cfg.patch_of is None else torch.as_tensor(cfg.patch_of)
        if patch_of.shape != (cfg.n_vocab,):
            raise ValueError(f"patch_of has {len(patch_of)} entries for {cfg.n_vocab} tokens")
        self.register_buffer("patch_of", patch_of, persistent=False)
        self.n_patches = int(patch_of.max()) + 1
        # made last, so that a model with a head starts with the same weights elsewhere as one without
        self.align_head = None if cfg.align_dim < 1 else nn.Sequential(
            nn.LayerNorm(cfg.d_model), nn.Linear(cfg.d_model, cfg.d_model), nn.GELU(),
            nn.Linear(cfg.d_model, cfg.align_dim))

    def patches(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The patch of each (B, N) token, padding sent to a spare slot ``n_patches``, and (B,
        n_patches + 1) which patches each star has (the spare slot never)."""
        patch = self.patch_of[ids].masked_fill(~mask, self.n_patches)
        present = torch.zeros(ids.shape[0], self.n_patches + 1, dtype=torch.bool, device=ids.device)
        present.scatter_(1, patch, True)
        present[:, -1] = False
        return patch, present

    def encode(self, ids: torch.Tensor, values: torch.Tensor, errors: torch.Tensor,
               mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N) observed tokens -> context (B, P, d) and its mask (B, P), P <= N patches.

        ``mask`` is True for real (non-padding) tokens; padded slots may hold any id/value: they
        are masked out."""
        patch, present = self.patches(ids, mask)
        x = self.embed(ids, values * mask, errors.masked_fill(~mask, 1.0), mask, patch, self.n_patches + 1)
        # keep the patches that have a token, packed to the left (their order is irrelevant)
        width = max(int(present.sum(1).max()), 1)
        order = torch.argsort((~present).to(torch.int8), dim=1, stable=True)[:, :width]
        x = torch.gather(x, 1, order.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        packed = torch.gather(present, 1, order)
        if self.stem is not None:
            stem_x, stem_mask = self.stem(ids, values * mask, errors.masked_fill(~mask, 1.0), mask)
            x, packed = torch.cat([x, stem_x], 1), torch.cat([packed, stem_mask], 1)
        return self.run_encoder(x, packed)

    def run_encoder(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder blocks over (B, P, d) embedded tokens with their (B, P) mask."""
        for block in self.encoder:
            x = block(x, mask)
        return self.encoder_norm(x), mask

    def decode_mixture(self, memory: torch.Tensor, mask: torch.Tensor, query_ids: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, Q) requested ids -> the predictive mixture in normalised units: means, log-variances
        and log-weights, each (B, Q, K) for K = ``n_components`` (one component: log-weight 0)."""
        q = self.query(query_ids)
        for block in self.decoder:
            q = block(q, memory, mask)
        out = rearrange(self.head(q), "b q (three k) -> three b q k", three=2 if self.cfg.n_components == 1 else 3)
        logweight = torch.zeros_like(out[0]) if len(out) == 2 else torch.log_softmax(out[2].float(), -1)
        return out[0], out[1].clamp(self.cfg.logvar_min, self.cfg.logvar_max), logweight

    def embed_vectors(self, ids: torch.Tensor, values: torch.Tensor, errors: torch.Tensor,
                      mask: torch.Tensor) -> torch.Tensor:
        """(B, N) observed tokens -> (B, D) unit vectors, one per star: the mean of the encoded
        tokens (:meth:`encode`), through the projection head if the model has one (``align_dim``),
        scaled to length one, so that the dot product of two is their cosine similarity."""
        memory, memory_mask = self.encode(ids, values, errors, mask)
        w = memory_mask.to(memory.dtype).unsqueeze(-1)
        pooled = (memory * w).sum(1) / w.sum(1).clamp_min(1)
        if self.align_head is not None:
            pooled = self.align_head(pooled)
        return F.normalize(pooled.float(), dim=-1)

    def forward(self, ids, values, errors, mask, query_ids):
        """The predictive mixture (:meth:`decode_mixture`) of each requested id."""
        return self.decode_mixture(*self.encode(ids, values, errors, mask), query_ids)

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # the per-token tables: the state-dict entries whose rows are token ids
    TOKEN_TABLES = ("embed.weight.weight", "embed.error_weight.weight", "embed.bias.weight", "embed.offset.weight",
                    "query.weight", "stem.value", "stem.error", "stem.presence")

    def with_new_tokens(self, n_new: int, like: list[int] | None = None, seed: int = 0,
                        copy_from: list[int | None] | None = None) -> StellarTransformer:
        """A copy of this model with ``n_new`` token ids appended (``Vocabulary.add_token``): each
        per-token table (:data:`TOKEN_TABLES`: the value, error, offset and name embeddings, the
        query vectors and the spectrum stem's tables) gets ``n_new`` new rows, every other weight is
        copied. A new token is a patch of its own and in no spectrum stem, so a star without it is
        encoded exactly as before and every old answer stays bit-identical.

        The new embedding and query rows are drawn, column by column, from a Gaussian with the mean
        and standard deviation of the rows of the token ids ``like`` (default: all), e.g. the
        trained labels: the frozen network then first sees the new token as one more token of a
        familiar kind rather than at the scale of a fresh initialisation. ``copy_from`` (one entry
        per new token) may name an existing token id whose rows a new token starts as a copy of
        (None: drawn as above): a new label that resembles an old one starts from its answers. The
        stem rows are zero (a new token is never summed by a stem).

        >>> from stellarlm.training import load_model
        >>> from stellarlm.pretrained import default_model_path
        >>> old, vocab, _ = load_model(default_model_path())
        >>> new = old.with_new_tokens(2, like=vocab.ids(["teff", "logg", "m_h", "alpha_m"]).tolist())
        >>> new.cfg.n_vocab - old.cfg.n_vocab, new.query.weight.shape[0] == len(vocab) + 2
        (2, True)
        >>> bool((new.query.weight[:len(vocab)] == old.query.weight).all())
        True
        """
        if n_new < 1:
            raise ValueError(f"n_new must be >= 1, got {n_new}")
        if copy_from is not None and len(copy_from) != n_new:
            raise ValueError(f"copy_from has {len(copy_from)} entries for {n_new} new tokens")
        from dataclasses import replace

        n_old = self.cfg.n_vocab
        patch_of = (list(range(n_old)) if self.cfg.patch_of is None else list(self.cfg.patch_of))
        patch_of += list(range(max(patch_of) + 1, max(patch_of) + 1 + n_new))
        stem_of = None if self.cfg.stem_of is None else list(self.cfg.stem_of) + [-1] * n_new
        cfg = replace(self.cfg, n_vocab=n_old + n_new, patch_of=patch_of, stem_of=stem_of)
        grown = StellarTransformer(cfg)
        gen = torch.Generator().manual_seed(seed)
        rows = torch.arange(n_old) if like is None else torch.as_tensor(list(like), dtype=torch.long)
        state = {}
        for name, old in self.state_dict().items():
            if name in self.TOKEN_TABLES:
                if name.startswith("stem."):
                    extra = old.new_zeros(n_new, old.shape[1])
                else:
                    ref = old[rows].float()
                    mean = ref.mean(0)
                    std = ref.std(0) if len(rows) > 1 else torch.ones(old.shape[1])
                    extra = (mean + std * torch.randn(n_new, old.shape[1], generator=gen)).to(old.dtype)
                    for j, src in enumerate(copy_from or []):
                        if src is not None:
                            extra[j] = old[src]
                state[name] = torch.cat([old, extra.to(old.device)])
            else:
                state[name] = old
        grown.load_state_dict(state)
        return grown.train(self.training).to(next(self.parameters()).device)


def mixture_moments(mean: torch.Tensor, logvar: torch.Tensor, logweight: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., K) components -> the mixture's mean and log-variance (...)."""
    w = logweight.exp()
    m = (w * mean).sum(-1)
    var = (w * (logvar.exp() + (mean - m.unsqueeze(-1)).square())).sum(-1)
    return m, torch.log(var)


def gaussian_nll(mean: torch.Tensor, logvar: torch.Tensor, target: torch.Tensor, target_err: torch.Tensor,
                 mask: torch.Tensor, beta: float | torch.Tensor = 0.0,
                 logweight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean Gaussian (or Gaussian-mixture) negative log-likelihood over ``mask``, with the target's
    own measurement variance added to the predicted one: the model learns the intrinsic scatter only.

    ``mean`` and ``logvar`` are (...) for one Gaussian, or (..., K) with ``logweight`` (..., K) for
    a mixture of K; the constant log(2 pi) / 2 is left out.

    ``beta`` > 0 weights each term by its (total) variance to the power ``beta``, held constant
    (the beta-NLL of Seitzer et al. 2022; for a mixture, its moment variance): the best variance is
    unchanged, but a very precise token (a bright star's XP flux bin, sigma ~ 1e-3 of its scale)
    no longer outweighs a label's gradient by a factor 1/sigma^2, which with gradient clipping slows
    everything else down.
    """
    if logweight is None:
        mean, logvar, logweight = mean.unsqueeze(-1), logvar.unsqueeze(-1), torch.zeros_like(mean).unsqueeze(-1)
    err2 = target_err.square()
    var = logvar.exp() + err2.unsqueeze(-1)
    log_p = logweight - 0.5 * (torch.log(var) + (target.unsqueeze(-1) - mean).square() / var)
    nll = -torch.logsumexp(log_p, -1)
    if torch.is_tensor(beta) or beta:  # a tensor: one beta per target
        _, logvar_total = mixture_moments(mean.detach(), logvar.detach(), logweight.detach())
        nll = nll * (logvar_total.exp() + err2) ** beta
    return (nll * mask).sum() / mask.sum().clamp_min(1)
