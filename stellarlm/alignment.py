"""One embedding space for every instrument: views, the contrastive alignment term, retrieval.

**The embedding** of a star (:meth:`stellarlm.StellarLM.embed`,
:meth:`stellarlm.model.StellarTransformer.embed_vectors`) is the mean of its encoded tokens (the
encoder's output, one vector per patch or scalar token), through a small projection head when the
model has one (``ModelConfig.align_dim``), scaled to unit length: cosine similarity is the dot
product. It is ``align_dim`` numbers long with a head, else ``d_model``.

**Views.** A star can be seen through four disjoint *views* (:data:`VIEWS`): its Gaia XP spectrum
(the 114 flux bins, without G), its LAMOST-like spectrum (200 bins), its labels (Teff, logg,
[M/H], [α/M]) or its photometry (G, BP, RP, J, H, Ks). The same star seen through any of them
should land at the same place.

**The alignment term** (SpecCLIP, arXiv:2507.01939, after CLIP): during training, with
``TrainConfig.align_weight`` > 0, each star of a batch is also drawn as two disjoint views
(:func:`draw_view_pairs`): two different sources it has, each whole, or (a quarter of the time)
one source against everything else the star has. Both are embedded and the symmetric InfoNCE loss
(:func:`info_nce`) over the batch pulls the two embeddings of the same star together and pushes
those of different stars apart; the temperature is ``TrainConfig.align_temperature``. The term is
added to the NLL with weight ``align_weight``; the NLL (what ``train_loss`` and ``val_loss``
report) is unchanged, and with weight 0 (the default) training is exactly what it was.

**Retrieval** (:func:`retrieval`): embed the test stars through view A and through view B; for
each star, the rank of its own B embedding among all stars' B embeddings, by similarity to its A
embedding. top-1, top-10 and the median rank summarise it (chance: 1/n, 10/n, n/2).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .vocab import LAMOST_NAMES, XP_NAMES

LABEL_NAMES = ["teff", "logg", "m_h", "alpha_m"]
PHOTOMETRY_NAMES = ["g", "bp", "rp", "j", "h", "k"]
VIEWS: dict[str, list[str]] = {"xp": XP_NAMES, "lamost": LAMOST_NAMES, "labels": LABEL_NAMES,
                               "photometry": PHOTOMETRY_NAMES}
P_COMPLEMENT = 0.25  # of the training pairs, the share whose first view is all but the second's source


def view_names(view: str | list[str], available=None) -> list[str]:
    """The token names of ``view`` (a key of :data:`VIEWS`, ``"all"``, or a list of names), restricted
    to ``available`` names when given.

    >>> view_names("labels")
    ['teff', 'logg', 'm_h', 'alpha_m']
    >>> view_names("photometry", available=["g", "teff", "bp"])
    ['g', 'bp']
    """
    from .errors import UnknownTokenError

    if isinstance(view, str):
        if view == "all":
            if available is None:
                raise ValueError("view 'all' needs the available names")
            return list(available)
        if view not in VIEWS:
            raise UnknownTokenError(view, list(VIEWS) + ["all"])
        names = VIEWS[view]
    else:
        names = list(view)
    return [n for n in names if available is None or n in set(available)]


# --- training -----------------------------------------------------------------------------------
def draw_view_pairs(data, rows: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Two disjoint views of each star ``rows`` of ``data`` (a :class:`~stellarlm.training.NormalisedData`),
    as padded inputs: ``align_a_*`` and ``align_b_*`` (ids, values, errors, mask), ``align_rows``
    and ``align_valid`` (stars with at least two sources).

    View B is one source the star has (XP, LAMOST-like, labels or photometry, all of its observed
    tokens), view A another, or a share :data:`P_COMPLEMENT` of the time every observed token
    not in B (the extinction and parallax tokens included)."""
    v, e = data.values[rows], data.errors[rows]
    avail = torch.isfinite(v)
    b = len(rows)
    col_source = data.sources[:, data.block]  # (S, T): which columns each source holds
    has = (avail[:, None, :] & col_source[None]).any(-1)  # (b, S)
    key = torch.rand(b, len(data.sources), generator=gen).masked_fill(~has, -1.0)
    order = torch.argsort(key, dim=1, descending=True)
    first = col_source[order[:, 0]] & avail  # (b, T)
    second = col_source[order[:, 1]] & avail if len(data.sources) > 1 else torch.zeros_like(avail)
    complement = avail & ~first
    use_complement = (torch.rand(b, 1, generator=gen) < P_COMPLEMENT)
    view_a = torch.where(use_complement, complement, second)
    valid = has.sum(1) >= 2
    out = {"align_rows": rows, "align_valid": valid}
    for tag, tokens in (("a", view_a), ("b", first)):
        count = tokens.sum(1)
        width = max(int(count.max()), 1)
        cols = torch.argsort((~tokens).to(torch.int8), dim=1, stable=True)[:, :width]
        mask = torch.gather(tokens, 1, cols)
        out[f"align_{tag}_ids"] = data.ids[cols]
        out[f"align_{tag}_values"] = torch.gather(v, 1, cols).masked_fill(~mask, 0.0)
        out[f"align_{tag}_errors"] = torch.gather(e, 1, cols).masked_fill(~mask, 1.0)
        out[f"align_{tag}_mask"] = mask
    return out


def info_nce(za: torch.Tensor, zb: torch.Tensor, temperature: float, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP's loss) of (n, D) unit vectors: row i of ``za`` and of ``zb`` are the
    same star, every other pair a different one. ``rows``: each pair's star; a star drawn twice in
    a batch is not counted as its own negative.

    >>> z = F.normalize(torch.randn(8, 4), dim=-1)
    >>> bool(info_nce(z, z, 0.05) < info_nce(z, z.roll(1, 0), 0.05))
    True
    """
    logits = za @ zb.T / temperature
    if rows is not None:
        twin = (rows[:, None] == rows[None, :]) & ~torch.eye(len(rows), dtype=torch.bool, device=rows.device)
        logits = logits.masked_fill(twin, -math.inf)
    target = torch.arange(len(za), device=za.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def alignment_loss(model, batch: dict, temperature: float) -> torch.Tensor:
    """:func:`info_nce` of the two views of :func:`draw_view_pairs` in ``batch``, over the stars
    that have both (0 with fewer than two such stars)."""
    valid = batch["align_valid"]
    if int(valid.sum()) < 2:
        return batch["align_a_values"].new_zeros(())
    z = {}
    for tag in ("a", "b"):
        args = [batch[f"align_{tag}_{k}"][valid] for k in ("ids", "values", "errors", "mask")]
        width = max(int(args[3].sum(1).max()), 1)
        z[tag] = model.embed_vectors(*(x[:, :width] for x in args))
    return info_nce(z["a"], z["b"], temperature, batch["align_rows"][valid])


@torch.no_grad()
def evaluate_alignment(model, data, cfg, device: torch.device, n_stars: int = 512, seed: int = 4321) -> dict:
    """InfoNCE loss and top-1 retrieval between the two views of the same fixed ``n_stars`` stars
    of ``data`` (the validation split), in batches of ``cfg.batch_size`` as in training."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randperm(len(data), generator=gen)[:n_stars]
    losses, hits, count = [], 0, 0
    for part in rows.split(max(cfg.batch_size, 2)):
        batch = {k: x.to(device) for k, x in draw_view_pairs(data, part, gen).items()}
        losses.append(float(alignment_loss(model, batch, cfg.align_temperature)))
        valid = batch["align_valid"]
        if int(valid.sum()) >= 2:
            za = model.embed_vectors(*(batch[f"align_a_{k}"][valid] for k in ("ids", "values", "errors", "mask")))
            zb = model.embed_vectors(*(batch[f"align_b_{k}"][valid] for k in ("ids", "values", "errors", "mask")))
            hits += int(((za @ zb.T).argmax(1) == torch.arange(len(za), device=device)).sum())
            count += len(za)
    model.train()
    return {"val_align_loss": float(np.mean(losses)), "val_align_top1": hits / max(count, 1)}


# --- measuring ----------------------------------------------------------------------------------
def ranks(query: np.ndarray, target: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """For unit vectors ``query`` (n, D) and ``target`` (n, D), row i the same star: the rank (1 =
    best) of target i among all targets by similarity to query i. Ties count against the star.

    >>> x = np.eye(3)
    >>> ranks(x, x).tolist()
    [1, 1, 1]
    """
    q = torch.as_tensor(np.asarray(query, np.float32))
    t = torch.as_tensor(np.asarray(target, np.float32))
    out = []
    for start in range(0, len(q), chunk):
        sim = q[start:start + chunk] @ t.T
        own = sim[torch.arange(len(sim)), torch.arange(start, start + len(sim))]
        out.append(1 + (sim > own[:, None]).sum(1) + ((sim == own[:, None]).sum(1) - 1))
    return torch.cat(out).numpy()


def retrieval_summary(r: np.ndarray) -> dict:
    """top-1, top-10 (shares) and the median rank of an array of ranks."""
    r = np.asarray(r)
    return {"top1": float(np.mean(r == 1)), "top10": float(np.mean(r <= 10)), "median_rank": float(np.median(r)),
            "n": int(len(r))}


def retrieval(model, table, views=tuple(VIEWS), batch_size: int = 1024, progress: bool = False) -> dict:
    """Cross-modal retrieval among the stars of ``table`` (a :class:`~stellarlm.TokenTable`) that
    have every one of ``views``: for each ordered pair (A, B) of different views, the top-1,
    top-10 and median rank of finding each star's B embedding from its A embedding
    (:func:`ranks`), over all those stars. Returns {"n_stars", "views", "pairs": {"A->B": {...}}}."""
    from tqdm import tqdm

    names = {v: view_names(v, table.names) for v in views}
    have = np.ones(len(table), dtype=bool)
    for v, cols in names.items():
        if not cols:
            raise ValueError(f"the table has no token of view {v!r}")
        have &= np.isfinite(table.select(cols).values).any(1)
    stars = table.subset(have)
    emb = {v: model.embed(stars.observed(cols), batch_size=batch_size)
           for v, cols in tqdm(names.items(), desc="embed views", disable=not progress)}
    pairs = {}
    for a in views:
        for b in views:
            if a != b:
                pairs[f"{a}->{b}"] = retrieval_summary(ranks(emb[a], emb[b]))
    return {"n_stars": int(have.sum()), "views": list(views), "pairs": pairs}
