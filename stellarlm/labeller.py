"""The model step of survey labelling: chunks of XP tokens + G -> answers, fast on CPU and GPU.

:class:`Labeller` loads a model once and answers ``want`` (mean, sigma, quantiles) for (n, 115)
arrays of XP flux tokens and G, with the calibration a query gets; :class:`FixedInputEncoder` is its
encoder for the survey case (every star has the same tokens). ``stellarlm label``
(:mod:`stellarlm.survey`) feeds it from the bulk files.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import BadValueError
from .vocab import XP_NAMES


class FixedInputEncoder:
    """``net.encode`` for a batch in which every star has the same tokens (all of ``ids``): the
    survey case, XP + G for every star. The embedding tables are looked up once instead of once
    per star, and the sum over each patch is a product with a fixed (tokens, patches) 0/1 matrix
    instead of a scatter: the same numbers (to float rounding), half the CPU time of the model."""

    CPU_EMBED_ROWS = 32

    def __init__(self, net, ids: np.ndarray):
        import torch

        emb = net.embed
        dev = next(net.parameters()).device
        t = torch.as_tensor(np.asarray(ids), device=dev)
        with torch.no_grad():
            self.w = emb.weight.weight[t].detach().clone()
            self.u = emb.error_weight.weight[t].detach().clone()
            self.c = (emb.offset.weight[t].detach().clone() if emb.offset is not None
                      else torch.zeros_like(self.w))
            patch = net.patch_of[t]
            uniq, inverse = torch.unique(patch, sorted=True, return_inverse=True)  # encode keeps patches in id order
            self.m = torch.zeros(len(t), len(uniq), device=dev)
            self.m[torch.arange(len(t), device=dev), inverse] = 1.0
            self.bias = self.m.T @ emb.bias.weight[t].detach()  # (P, d): the summed name biases
        self.ids = t.unsqueeze(0)
        self.net = net

    def encode(self, values, errors):
        import torch
        import torch.nn.functional as F

        s = torch.log(errors.clamp_min(1e-4)).unsqueeze(-1) / 4.0
        # (B, N, d) per-token activations, summed over each patch. On a CPU they go CPU_EMBED_ROWS
        # stars at a time, so each slice stays in cache: 5x less time than one (B, N, d) tensor
        # making four trips through memory (docs/survey_scale.md); on a GPU, the whole batch at once.
        step = self.CPU_EMBED_ROWS if values.device.type == "cpu" else max(len(values), 1)
        m = self.m.to(values.dtype)
        summed = values.new_empty(len(values), m.shape[1], self.w.shape[1])
        for a in range(0, len(values), step):
            h = torch.addcmul(self.c, values[a:a + step].unsqueeze(-1), self.w)
            h.addcmul_(s[a:a + step], self.u)
            summed[a:a + step] = torch.matmul(F.gelu(h).transpose(1, 2), m).transpose(1, 2)  # (b, P, d)
        x = self.net.embed.out(summed) + self.bias.to(summed.dtype)
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        if self.net.stem is not None:
            ids = self.ids.expand(len(values), -1)
            stem_x, stem_mask = self.net.stem(ids, values, errors, torch.ones_like(ids, dtype=torch.bool))
            x, mask = torch.cat([x, stem_x.to(x.dtype)], 1), torch.cat([mask, stem_mask], 1)
        return self.net.run_encoder(x, mask)


class Labeller:
    """A loaded model that answers ``want`` for chunks of XP tokens + G, on CPU or GPU."""

    # stars per model batch on a CPU: small enough that a layer's activations stay in cache (2048,
    # the old default, was 1.3x slower on the 2 cores; docs/survey_scale.md)
    CPU_BATCH = 512

    def __init__(self, model_dir, want: Sequence[str] = ("teff", "logg", "m_h"), *, device: str = "cpu",
                 batch_size: int | None = None, quantiles: Sequence[float] = (), compile: bool = False,
                 amp: bool | None = None, fast_encoder: bool = True):
        import torch

        from .predictor import Predictor

        self.model_dir = Path(model_dir)
        self.lm = Predictor.load(self.model_dir, device=device)
        self.device = self.lm.device
        self.want = list(want)
        self.inputs = XP_NAMES + ["g"]
        missing = [n for n in self.inputs if n not in self.lm.vocab]
        if missing:
            raise BadValueError(f"model {model_dir} has no XP flux tokens ({missing[:3]}...): it was trained with "
                                "another vocabulary; retrain it")
        self.lm._check_trained(self.want + self.inputs)
        self.want_ids = self.lm.vocab.ids(self.want)
        self.in_ids = self.lm.vocab.ids(self.inputs)
        self.quantiles = [float(q) for q in quantiles]
        cuda = self.device.type == "cuda"
        self.batch_size = batch_size or (32768 if cuda else self.CPU_BATCH)
        self.amp = cuda if amp is None else amp
        self.pin = cuda
        self.net = self.lm.model
        if compile:
            self.net = torch.compile(self.net, dynamic=True)
        self.q_ids = torch.as_tensor(self.want_ids, device=self.device)
        self.fixed = FixedInputEncoder(self.lm.model, self.in_ids) if fast_encoder else None
        self.model_sha256 = self.lm.model_sha256  # hashed once, when Predictor.load read the weights

    def _tensor(self, a, dtype):
        import torch

        t = torch.from_numpy(np.ascontiguousarray(a)).to(dtype)
        if self.pin:
            t = t.pin_memory()
        return t.to(self.device, non_blocking=self.pin)

    def predict(self, values: np.ndarray, errors: np.ndarray):
        """(n, 115) XP tokens + G and their errors (physical units, NaN missing) -> Predictive."""
        import torch

        from .predictive import Predictive, stack
        from .input_kinds import input_kind
        from .predictor import pack_present

        lm = self.lm
        vn, en = lm.vocab.normalise(values, self.in_ids, errors)
        en = np.where(np.isfinite(en), en, lm._typical_error[self.in_ids])
        present = np.isfinite(vn)
        empty = ~present.any(1)
        parts = []
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            for start in range(0, len(vn), self.batch_size):
                sl = slice(start, start + self.batch_size)
                p = present[sl]
                b = len(p)
                if p.all() and self.fixed is not None:  # the usual case: every token there
                    memory, memory_mask = self.fixed.encode(self._tensor(vn[sl], torch.float32),
                                                            self._tensor(en[sl], torch.float32))
                else:
                    tok, val, err, mask = pack_present(self.in_ids, vn[sl], en[sl], p)
                    memory, memory_mask = self.net.encode(
                        self._tensor(tok, torch.long), self._tensor(val, torch.float32),
                        self._tensor(err, torch.float32), self._tensor(mask, torch.bool))
                mean, logvar, logweight = self.net.decode_mixture(memory, memory_mask, self.q_ids.expand(b, -1))
                w, mu, sd = (x.float().cpu().double().numpy() for x in
                             (logweight.exp(), mean, torch.exp(0.5 * logvar.float())))
                mu, sd = lm.vocab.denormalise(mu, self.want_ids[:, None], sd)
                parts.append(Predictive(self.want, w / w.sum(-1, keepdims=True), mu, sd))
        answer = lm._calibrated(stack(parts), self.want_ids, input_kind(lm.vocab, self.in_ids, present))
        for a in (answer.weight, answer.mean, answer.sigma):
            a[empty] = np.nan
        return answer

    def columns(self, values: np.ndarray, errors: np.ndarray) -> dict[str, np.ndarray]:
        """Output columns (float32): each wanted name, its sigma and the requested quantiles."""
        answer = self.predict(values, errors)
        mean, sigma = answer.moments()
        out = {}
        for j, name in enumerate(self.want):
            out[name] = mean[:, j].astype(np.float32)
            out[f"{name}_err"] = sigma[:, j].astype(np.float32)
        for q in self.quantiles:
            qv = answer.quantile(q)
            for j, name in enumerate(self.want):
                out[f"{name}_q{_q_label(q)}"] = qv[:, j].astype(np.float32)
        return out


def _q_label(q: float) -> str:
    """0.16 -> '16', 0.5 -> '50', 0.025 -> '2.5'."""
    s = f"{100 * q:.6g}"
    return s
