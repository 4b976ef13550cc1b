"""Per-sample reference implementations, written from the papers' equations in numpy (float64), step by step.

They share no code with lrp_core: each recomputes the forward pass, forms every contribution explicitly (the
(units x features) contribution matrix of a linear map, each pair's root point) and divides without stabilisers.
The tests compare lrp_core against them; ``benchmarks/beyond_cnn.py`` times them as the per-sample baseline.
"""

from __future__ import annotations

import numpy as np


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _epsilon_linear(inputs: np.ndarray, weight: np.ndarray, z: np.ndarray, relevance: np.ndarray, eps: float):
    """LRP-epsilon of ``z = W inputs + b`` by its contribution matrix: ``R_j = sum_k x_j W_kj R_k / (z_k +- eps)``."""
    contributions = weight * inputs[None, :]
    denominator = z + np.where(z >= 0, eps, -eps)
    return (contributions / denominator[:, None] * relevance[:, None]).sum(0)


def lstm_layer(params, x, relevance_h, relevance_c_last=None, reverse=False, eps=1e-9):
    """One LSTM layer, one direction, one sequence ``x`` (T, I); ``relevance_h`` (T, H) on every hidden state.

    Returns (input relevance (T, I), hidden states (T, H)). Zero initial state.
    """
    w_ih, w_hh, b_ih, b_hh = params
    hidden = w_hh.shape[1]
    steps = list(range(len(x)))[::-1] if reverse else list(range(len(x)))
    h, c = np.zeros(hidden), np.zeros(hidden)
    saved = {}
    hs = np.zeros((len(x), hidden))
    for t in steps:
        gates = w_ih @ x[t] + b_ih + w_hh @ h + b_hh
        i = _sigmoid(gates[:hidden])
        f = _sigmoid(gates[hidden : 2 * hidden])
        z_g = gates[2 * hidden : 3 * hidden]
        g = np.tanh(z_g)
        o = _sigmoid(gates[3 * hidden :])
        c_new = f * c + i * g
        saved[t] = (h, c, f, i, g, z_g, c_new)
        h, c = o * np.tanh(c_new), c_new
        hs[t] = h
    relevance_x = np.zeros_like(x)
    carry_h = np.zeros(hidden)
    carry_c = np.zeros(hidden) if relevance_c_last is None else relevance_c_last
    for t in steps[::-1]:
        h_prev, c_prev, f, i, g, z_g, c_new = saved[t]
        r_h = relevance_h[t] + carry_h
        r_c = carry_c + r_h  # h = o * tanh(c): all relevance to the cell (signal-take-all)
        denominator = c_new + np.where(c_new >= 0, eps, -eps)
        carry_c = f * c_prev / denominator * r_c
        r_g = i * g / denominator * r_c  # i * g: all to the signal g, then through tanh to its pre-activation
        w_x, w_h = w_ih[2 * hidden : 3 * hidden], w_hh[2 * hidden : 3 * hidden]
        relevance_x[t] = _epsilon_linear(x[t], w_x, z_g, r_g, eps)
        carry_h = _epsilon_linear(h_prev, w_h, z_g, r_g, eps)
    return relevance_x, hs


def gru_layer(params, x, relevance_h, reverse=False, eps=1e-9):
    """One GRU layer, one direction; as :func:`lstm_layer`."""
    w_ih, w_hh, b_ih, b_hh = params
    hidden = w_hh.shape[1]
    steps = list(range(len(x)))[::-1] if reverse else list(range(len(x)))
    h = np.zeros(hidden)
    saved = {}
    hs = np.zeros((len(x), hidden))
    for t in steps:
        gx, gh = w_ih @ x[t] + b_ih, w_hh @ h + b_hh
        r = _sigmoid(gx[:hidden] + gh[:hidden])
        z = _sigmoid(gx[hidden : 2 * hidden] + gh[hidden : 2 * hidden])
        a = gx[2 * hidden :] + r * gh[2 * hidden :]
        n = np.tanh(a)
        h_new = (1 - z) * n + z * h
        saved[t] = (h, r, z, n, a, h_new)
        h = h_new
        hs[t] = h
    relevance_x = np.zeros_like(x)
    carry = np.zeros(hidden)
    for t in steps[::-1]:
        h_prev, r, z, n, a, h_new = saved[t]
        r_h = relevance_h[t] + carry
        denominator = h_new + np.where(h_new >= 0, eps, -eps)
        r_n = (1 - z) * n / denominator * r_h
        direct = z * h_prev / denominator * r_h
        # a = W_in x + b_in + r * (W_hn h + b_hn): linear in x and in h with the weight diag(r) W_hn
        relevance_x[t] = _epsilon_linear(x[t], w_ih[2 * hidden :], a, r_n, eps)
        carry = direct + _epsilon_linear(h_prev, r[:, None] * w_hh[2 * hidden :], a, r_n, eps)
    return relevance_x, hs


def neon_kmeans(centers, x, cluster, beta):
    """NEON for one sample: ``f_c = min_k w_k x + b_k``, soft-min over competitors, midpoint rule."""
    mu_c = centers[cluster]
    units = []
    for k in range(len(centers)):
        if k == cluster:
            continue
        w = 2 * (mu_c - centers[k])
        b = centers[k] @ centers[k] - mu_c @ mu_c
        units.append((w, w @ x + b, (mu_c + centers[k]) / 2))
    h = np.array([u[1] for u in units])
    logit = h.min()
    p = np.exp(-beta * (h - h.min()))
    p /= p.sum()
    relevance = np.zeros_like(x)
    for (w, value, midpoint), share in zip(units, p):
        relevance += w * (x - midpoint) / value * logit * share
    return relevance, logit


def _softmin_weights(values, temperature):
    e = np.exp(-temperature * (values - values.min()))
    return e / e.sum()


def one_class_svm(vectors, alpha, gamma, x):
    """OC-DTD for one sample: ``o = smin_j(||x - u_j||^2 - log(a_j) / gamma)``, shares ``(x_d - u_jd)^2 / d_j``."""
    a = alpha / alpha.sum()
    d = ((x[None, :] - vectors) ** 2).sum(1)
    units = d - np.log(a) / gamma
    score = -np.log(np.sum(np.exp(-gamma * units))) / gamma
    relevance = (_softmin_weights(units, gamma)[:, None] * score * (x[None, :] - vectors) ** 2 / d[:, None]).sum(0)
    return relevance, score


def svc(positive, a_pos, negative, a_neg, intercept, gamma, x):
    """Neuralized binary SVC for one sample, every pair unit built explicitly.

    Units ``h_pq = ||x - v_q||^2 - ||x - u_p||^2`` (positive p, negative q; the intercept is a pseudo support
    vector with no distance term on the side of its sign); ``g = smin_q smax_p (h_pq + weights)``. Relevance passes
    the two pools in proportion to the pooled values (``R_pq = P_q P_p h_pq``, posteriors ``P``), each unit by the
    midpoint rule with its explicit midpoint, and the remainder ``g - sum R`` is spread in proportion to ``|R_d|``.
    """
    own = [(u, -np.log(a) / gamma) for u, a in zip(positive, a_pos)]
    rival = [(v, -np.log(a) / gamma) for v, a in zip(negative, a_neg)]
    if intercept > 0:
        own.append((None, -np.log(intercept) / gamma))
    elif intercept < 0:
        rival.append((None, -np.log(-intercept) / gamma))

    def distance(center):
        return 0.0 if center is None else float(((x - center) ** 2).sum())

    own_units = np.array([distance(u) + c for u, c in own])
    rival_units = np.array([distance(v) + c for v, c in rival])
    o_pos = -np.log(np.sum(np.exp(-gamma * own_units))) / gamma
    o_neg = -np.log(np.sum(np.exp(-gamma * rival_units))) / gamma
    g = o_neg - o_pos
    p_own = _softmin_weights(own_units, gamma)
    p_rival = _softmin_weights(rival_units, gamma)
    contrast = np.zeros_like(x)
    for (u, _), share_p in zip(own, p_own):
        for (v, _), share_q in zip(rival, p_rival):
            h = distance(v) - distance(u)
            r = share_p * share_q * h
            if u is not None and v is not None:
                w = 2 * (u - v)
                contrast += w * (x - (u + v) / 2) / h * r
            elif u is None:
                contrast += (x - v) ** 2 / distance(v) * r
            else:
                contrast += (x - u) ** 2 / distance(u) * r  # h = -d_p, r = P P h: the sign comes with r
    relevance = contrast + (g - contrast.sum()) * np.abs(contrast) / np.abs(contrast).sum()
    return relevance, g
