"""Task-specific baselines that stellarlm is measured against: XGBoost, a plain MLP, k-nearest neighbours.

Each takes physical-unit inputs X (n, k) with NaN for missing, and targets Y (n, m) with errors,
trains on the training split with early stopping on the validation split, and predicts the test split.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import torch

from stellarlm.vocab import robust_stats


def xgboost_predict(x_train, y_train, x_val, y_val, x_test, seed: int = 0, max_rounds: int = 3000
                    ) -> tuple[np.ndarray, dict]:
    """One XGBoost regressor per target column, early stopping on validation RMSE."""
    try:
        import xgboost as xgb
    except ImportError:
        raise ImportError("the XGBoost baseline needs xgboost: pip install 'stellarlm[bench]'") from None

    out = np.full((len(x_test), y_train.shape[1]), np.nan)
    info = {"best_iterations": [], "seconds": 0.0}
    t0 = time.time()
    params = {"eta": 0.05, "max_depth": 6, "subsample": 0.8, "colsample_bytree": 0.5, "tree_method": "hist",
              "nthread": 2, "seed": seed, "objective": "reg:squarederror"}
    for j in range(y_train.shape[1]):
        tr, va = np.isfinite(y_train[:, j]), np.isfinite(y_val[:, j])
        dtrain = xgb.DMatrix(x_train[tr], label=y_train[tr, j], missing=np.nan)
        dval = xgb.DMatrix(x_val[va], label=y_val[va, j], missing=np.nan)
        booster = xgb.train(params, dtrain, num_boost_round=max_rounds, evals=[(dval, "val")],
                            early_stopping_rounds=50, verbose_eval=False)
        out[:, j] = booster.predict(xgb.DMatrix(x_test, missing=np.nan),
                                    iteration_range=(0, booster.best_iteration + 1))
        info["best_iterations"].append(int(booster.best_iteration))
    info["seconds"] = round(time.time() - t0, 1)
    return out, info


def mlp_predict(x_train, y_train, e_train, x_val, y_val, e_val, x_test, seed: int = 0, hidden: int = 256,
                max_epochs: int = 300, patience: int = 15) -> tuple[np.ndarray, np.ndarray, dict]:
    """A plain MLP (inputs -> mean and log-variance per target), Gaussian NLL with the target's own
    variance added (as stellarlm's loss), early stopping on validation NLL. Inputs and targets are
    standardised with training medians/MADs; missing inputs are set to 0 with a missing flag."""
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
    net = torch.nn.Sequential(torch.nn.Linear(xt.shape[1], hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden),
                              torch.nn.GELU(), torch.nn.Linear(hidden, 2 * m))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)

    def nll(x, y, e):
        mean, logvar = net(x).split(m, dim=1)
        ok = torch.isfinite(y)
        var = logvar.clamp(-14, 6).exp() + torch.nan_to_num(e) ** 2
        r = torch.where(ok, (torch.nan_to_num(y) - mean) ** 2 / var + torch.log(var), torch.zeros_like(var))
        return 0.5 * r.sum() / ok.sum()

    best, best_state, bad, t0 = np.inf, {k: p.clone() for k, p in net.state_dict().items()}, 0, time.time()
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(max_epochs):
        net.train()
        for idx in torch.randperm(len(xt), generator=gen).split(256):
            loss = nll(xt[idx], yt[idx], et[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            v = nll(xv, yv, ev).item()
        if v < best - 1e-4:
            best, best_state, bad = v, {k: p.clone() for k, p in net.state_dict().items()}, 0
        else:
            bad += 1
            if bad >= patience:
                break
    net.load_state_dict(best_state)
    with torch.no_grad():
        mean, logvar = net(prep_x(x_test)).split(m, dim=1)
    return (mean.numpy() * ys + yc, np.exp(0.5 * logvar.clamp(-14, 6).numpy()) * ys,
            {"epochs": epoch + 1, "best_val_nll": best, "seconds": round(time.time() - t0, 1)})


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
