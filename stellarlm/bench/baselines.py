"""Task-specific baselines that stellarlm is measured against, each tuned as a careful practitioner
would tune it, on the validation split only (the evaluated split is never looked at).

Every baseline takes physical-unit inputs X (n, k) with NaN for missing, and targets Y (n, m)
(NaN = unknown label) with errors E, trains on the training split and predicts the evaluated split:

- :func:`xgboost_predict`: one XGBoost regressor per target, a small grid of ``max_depth`` (4, 6, 8)
  x learning rate (0.03, 0.1); each grid point's number of rounds is chosen by early stopping on
  the validation RMSE (50 rounds' patience), and each target keeps the grid point with the lowest
  validation RMSE (recorded in ``info["chosen"]``).
- :func:`mlp_predict`: an MLP with 3 hidden layers of 512 GELU units, inputs -> mean and
  log-variance per target, Gaussian NLL with each label's own measurement variance added (NaN
  labels masked). AdamW (lr 1e-3, weight decay 1e-4), batch 512, 60 epochs with a per-step cosine
  decay of the learning rate to 0, keeping the weights of the epoch with the best validation NLL.
  Inputs: robust z-scores (training median and MAD) squashed as 3 asinh(z / 3), missing inputs set
  to 0 with one missing flag per input. Targets in ``log_columns`` (the bench passes Teff) are
  learnt as log10 and turned back at the end: mean 10**m, sigma ln(10) 10**m s.
- :func:`mlp_ensemble_predict`: a deep ensemble of 5 such MLPs (seeds seed, seed + 1, ...): the
  mean of their means, and the variance = mean of their variances + variance of their means.
- :func:`knn_predict`: the mean label of the k = 16 nearest training stars.
- :func:`linear_predict`: ridge regression (used by the task benchmarks, not by ``stellarlm bench``).

The trainers' ``info`` holds the settings used and the cost: ``cpu_seconds`` (``time.process_time``
difference, every thread of the process) and ``wall_seconds``.

>>> rng = np.random.default_rng(0)
>>> x = rng.normal(size=(300, 3)); y = np.column_stack([5000 + 500 * x[:, 0], x[:, 1]])
>>> mean, sigma, info = mlp_predict(x[:200], y[:200], np.full((200, 2), 0.01), x[200:250], y[200:250],
...                                 np.full((50, 2), 0.01), x[250:], max_epochs=2, log_columns=[0])
>>> mean.shape, bool((mean[:, 0] > 1000).all()), info["hidden"], info["layers"]
((50, 2), True, 512, 3)
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from stellarlm.vocab import robust_stats


def _cost(cpu0: float, wall0: float) -> dict:
    return {"cpu_seconds": round(time.process_time() - cpu0, 2), "wall_seconds": round(time.perf_counter() - wall0, 2)}


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run a block with ``torch.set_num_threads(n)`` (None: leave it), restoring the old count.

    >>> with torch_threads(1):
    ...     torch.get_num_threads()
    1
    """
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def xgboost_predict(x_train, y_train, x_val, y_val, x_test, seed: int = 0, max_rounds: int = 3000,
                    max_depths: Sequence[int] = (4, 6, 8), learning_rates: Sequence[float] = (0.03, 0.1),
                    early_stopping_rounds: int = 50, subsample: float = 0.8, colsample_bytree: float = 0.5,
                    nthread: int = 2, targets: Sequence[str] | None = None) -> tuple[np.ndarray, dict]:
    """One XGBoost regressor per target column, tuned on the validation split: for every
    (max_depth, learning rate) of the grid, the rounds are chosen by early stopping on validation
    RMSE; each target keeps the grid point with the lowest validation RMSE.

    ``info["chosen"]`` (keyed by ``targets``, else by column index) gives, per target, the chosen
    ``max_depth``, ``learning_rate``, ``rounds`` and ``val_rmse``; ``info["grid"]`` every grid
    point's validation RMSE and rounds.
    """
    try:
        import xgboost as xgb
    except ImportError:
        raise ImportError("the XGBoost baseline needs xgboost: pip install 'stellarlm[bench]'") from None

    cpu0, wall0 = time.process_time(), time.perf_counter()
    names = list(targets) if targets is not None else [str(j) for j in range(y_train.shape[1])]
    if len(names) != y_train.shape[1]:
        raise ValueError(f"targets names {names} do not match the {y_train.shape[1]} target columns")
    out = np.full((len(x_test), y_train.shape[1]), np.nan)
    info = {"max_depths": list(max_depths), "learning_rates": list(learning_rates), "max_rounds": max_rounds,
            "early_stopping_rounds": early_stopping_rounds, "subsample": subsample,
            "colsample_bytree": colsample_bytree, "nthread": nthread, "chosen": {}, "grid": {}}
    dtest = xgb.DMatrix(x_test, missing=np.nan, nthread=nthread)
    for j, name in enumerate(names):
        tr, va = np.isfinite(y_train[:, j]), np.isfinite(y_val[:, j])
        dtrain = xgb.DMatrix(x_train[tr], label=y_train[tr, j], missing=np.nan, nthread=nthread)
        dval = xgb.DMatrix(x_val[va], label=y_val[va, j], missing=np.nan, nthread=nthread)
        best, grid = None, []
        for depth in max_depths:
            for eta in learning_rates:
                params = {"eta": eta, "max_depth": depth, "subsample": subsample, "colsample_bytree": colsample_bytree,
                          "tree_method": "hist", "nthread": nthread, "seed": seed, "objective": "reg:squarederror",
                          "eval_metric": "rmse"}
                booster = xgb.train(params, dtrain, num_boost_round=max_rounds, evals=[(dval, "val")],
                                    early_stopping_rounds=early_stopping_rounds, verbose_eval=False)
                point = {"max_depth": depth, "learning_rate": eta, "rounds": int(booster.best_iteration) + 1,
                         "val_rmse": float(booster.best_score)}
                grid.append(point)
                if best is None or point["val_rmse"] < best[0]["val_rmse"]:
                    best = (point, booster)
        point, booster = best
        out[:, j] = booster.predict(dtest, iteration_range=(0, point["rounds"]))
        info["chosen"][name], info["grid"][name] = point, grid
    info.update(_cost(cpu0, wall0))
    return out, info


def mlp_predict(x_train, y_train, e_train, x_val, y_val, e_val, x_test, seed: int = 0, hidden: int = 512,
                layers: int = 3, lr: float = 1e-3, weight_decay: float = 1e-4, batch_size: int = 512,
                max_epochs: int = 60, schedule: str = "cosine", log_columns: Sequence[int] = ()
                ) -> tuple[np.ndarray, np.ndarray, dict]:
    """An MLP (inputs -> mean and log-variance per target) trained with the Gaussian NLL, each
    label's own measurement variance added (as stellarlm's loss) and NaN labels masked.

    ``layers`` hidden layers of ``hidden`` GELU units; AdamW (``lr``, ``weight_decay``), batches of
    ``batch_size``, ``max_epochs`` epochs; ``schedule`` "cosine" decays the learning rate per step
    to 0 over the epochs, "constant" keeps it. The weights of the epoch with the best validation
    NLL are kept (``info["best_epoch"]``, 1-based). Inputs: robust z-scores (training median and
    MAD) squashed as 3 asinh(z / 3); a missing input is 0 with its missing flag set. Targets are
    standardised with training medians and MADs; the columns in ``log_columns`` (positive, e.g.
    Teff) are learnt as log10 and returned in their own units: mean 10**m, sigma ln(10) 10**m s.

    Returns the predicted mean and sigma (the model's own, without the label's error) for
    ``x_test`` and an ``info`` dict (settings, best epoch, best validation NLL, cost).
    """
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', not {schedule!r}")
    cpu0, wall0 = time.process_time(), time.perf_counter()
    log_columns = sorted({int(c) for c in log_columns})
    y_train, e_train, y_val, e_val = (np.array(a, dtype=np.float64) for a in (y_train, e_train, y_val, e_val))
    for y, e in ((y_train, e_train), (y_val, e_val)):
        for c in log_columns:
            if (y[:, c] <= 0).any():
                raise ValueError(f"target column {c} is learnt as log10 but has values <= 0")
            e[:, c] = e[:, c] / (y[:, c] * math.log(10.0))  # d log10(y) = dy / (y ln 10)
            y[:, c] = np.log10(y[:, c])
    torch.manual_seed(seed)
    xc, xs = robust_stats(x_train)
    yc, ys = robust_stats(y_train)

    def prep_x(x):
        z = (x - xc) / xs
        z = 3.0 * np.arcsinh(z / 3.0)
        return torch.tensor(np.concatenate([np.nan_to_num(z), np.isnan(z)], 1), dtype=torch.float32)

    def prep_y(y, e):
        return (torch.tensor((y - yc) / ys, dtype=torch.float32), torch.tensor(e / ys, dtype=torch.float32))

    xt, (yt, et) = prep_x(x_train), prep_y(y_train, e_train)
    xv, (yv, ev) = prep_x(x_val), prep_y(y_val, e_val)
    m = y_train.shape[1]
    blocks, width = [], xt.shape[1]
    for _ in range(layers):
        blocks += [torch.nn.Linear(width, hidden), torch.nn.GELU()]
        width = hidden
    net = torch.nn.Sequential(*blocks, torch.nn.Linear(width, 2 * m))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(xt) / batch_size)
    total = max(1, max_epochs * steps_per_epoch)
    if schedule == "cosine":  # per step, from lr down to 0 at the end of the last epoch
        factor = lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))  # noqa: E731
    else:
        factor = lambda step: 1.0  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)

    def nll(x, y, e):
        mean, logvar = net(x).split(m, dim=1)
        ok = torch.isfinite(y)
        var = logvar.clamp(-14, 6).exp() + torch.nan_to_num(e) ** 2
        r = torch.where(ok, (torch.nan_to_num(y) - mean) ** 2 / var + torch.log(var), torch.zeros_like(var))
        return 0.5 * r.sum() / ok.sum().clamp(min=1)

    best, best_epoch, best_state = np.inf, 0, {k: p.clone() for k, p in net.state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(max_epochs):
        net.train()
        for idx in torch.randperm(len(xt), generator=gen).split(batch_size):
            loss = nll(xt[idx], yt[idx], et[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        net.eval()
        with torch.no_grad():
            v = nll(xv, yv, ev).item()
        if v < best:
            best, best_epoch, best_state = v, epoch + 1, {k: p.clone() for k, p in net.state_dict().items()}
    net.load_state_dict(best_state)
    with torch.no_grad():
        mean, logvar = net(prep_x(x_test)).split(m, dim=1)
    mean = mean.double().numpy() * ys + yc
    sigma = np.exp(0.5 * logvar.clamp(-14, 6).double().numpy()) * ys
    for c in log_columns:  # back from log10: the median 10**m, and the first-order sigma
        mean[:, c] = 10.0 ** mean[:, c]
        sigma[:, c] = math.log(10.0) * mean[:, c] * sigma[:, c]
    info = {"hidden": hidden, "layers": layers, "lr": lr, "weight_decay": weight_decay, "batch_size": batch_size,
            "epochs": max_epochs, "schedule": schedule, "log_columns": log_columns, "seed": seed,
            "best_epoch": best_epoch, "best_val_nll": float(best), **_cost(cpu0, wall0)}
    return mean, sigma, info


def combine_ensemble(means: Sequence[np.ndarray], sigmas: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The mean and sigma of an equal-weight mixture of Gaussian members: the mean of the means, and
    the variance = mean of the variances + variance of the means (population variance).

    >>> m, s = combine_ensemble([np.array([0.0]), np.array([2.0])], [np.array([1.0]), np.array([1.0])])
    >>> float(m[0]), round(float(s[0] ** 2), 12)
    (1.0, 2.0)
    """
    means, sigmas = np.stack(means), np.stack(sigmas)
    return means.mean(0), np.sqrt((sigmas ** 2).mean(0) + means.var(0))


def mlp_ensemble_predict(x_train, y_train, e_train, x_val, y_val, e_val, x_test, seed: int = 0, members: int = 5,
                         **mlp_kwargs) -> tuple[np.ndarray, np.ndarray, dict]:
    """A deep ensemble: ``members`` :func:`mlp_predict` networks with seeds ``seed``, ``seed + 1``, ...
    (different initial weights and batch orders), combined by :func:`combine_ensemble` in the
    targets' own units. ``mlp_kwargs`` go to every member; ``info`` holds the shared settings, each
    member's seed, best epoch and best validation NLL, and ``mean_member_sigma``, the members' sigma
    averaged over members and stars, per target column."""
    cpu0, wall0 = time.process_time(), time.perf_counter()
    means, sigmas, infos = [], [], []
    for i in range(members):
        mean, sigma, info = mlp_predict(x_train, y_train, e_train, x_val, y_val, e_val, x_test, seed=seed + i,
                                        **mlp_kwargs)
        means.append(mean)
        sigmas.append(sigma)
        infos.append(info)
    mean, sigma = combine_ensemble(means, sigmas)
    settings = {k: v for k, v in infos[0].items() if k not in ("seed", "best_epoch", "best_val_nll", "cpu_seconds",
                                                                "wall_seconds")}
    info = {**settings, "n_members": members, "seeds": [seed + i for i in range(members)],
            "best_epochs": [i["best_epoch"] for i in infos], "best_val_nlls": [i["best_val_nll"] for i in infos],
            "mean_member_sigma": np.mean(sigmas, axis=0).mean(0).tolist(), **_cost(cpu0, wall0)}
    return mean, sigma, info


def knn_predict(x_train, y_train, x_test, k: int = 16) -> np.ndarray:
    """Mean label of the k nearest training stars in standardised input space (missing inputs -> 0)."""
    xc, xs = robust_stats(x_train)
    a = torch.tensor(np.nan_to_num((x_train - xc) / xs), dtype=torch.float32)
    b = torch.tensor(np.nan_to_num((x_test - xc) / xs), dtype=torch.float32)
    out = np.full((len(x_test), y_train.shape[1]), np.nan)
    for start in range(0, len(b), 1024):
        d = torch.cdist(b[start:start + 1024], a)
        idx = d.topk(k, largest=False).indices.numpy()
        with warnings.catch_warnings():  # a label that none of the k neighbours has stays NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            out[start:start + 1024] = np.nanmean(y_train[idx], axis=1)
    return out


def linear_predict(x_train, y_train, x_test, ridge: float = 1e-3) -> np.ndarray:
    """Ridge-regularised linear regression from standardised inputs (missing inputs -> the training
    median) to every target column at once, fitted on the training rows whose targets are all known."""
    xc, xs = robust_stats(x_train)

    def design(x):
        z = np.nan_to_num((x - xc) / xs)
        return np.concatenate([z, np.ones((len(z), 1))], axis=1)

    rows = np.isfinite(y_train).all(1)
    a, y = design(x_train[rows]), y_train[rows]
    if len(a) == 0:
        raise ValueError("linear baseline: no training row has every target")
    reg = ridge * len(a) * np.eye(a.shape[1])
    reg[-1, -1] = 0.0  # no penalty on the intercept
    coef = np.linalg.solve(a.T @ a + reg, a.T @ y)
    return design(x_test) @ coef
