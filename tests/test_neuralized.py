"""Neuralized k-means, SVC and one-class SVM: same decisions as scikit-learn, relevance equal to per-sample
references, relevance summing to the explained output, and known answers on data built for them."""

from __future__ import annotations

import lrp_reference
import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.metrics.pairwise import rbf_kernel
from sklearn.svm import SVC, OneClassSVM
from torch import nn

import lrp_core
from lrp_core import composites, rules
from lrp_core.errors import UnsupportedLayerError
from lrp_core.neuralized import NeuralizedKMeans, NeuralizedOneClassSVM, NeuralizedSVC, neuralize


def _blobs(seed: int, n: int = 240, features: int = 6, informative: int = 0, shift: float = 4.0):
    """Gaussian noise where only feature ``informative`` differs between the two halves."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features))
    labels = np.arange(n) % 2
    x[:, informative] += shift * labels
    return x, labels


def _share(relevance: torch.Tensor, feature: int) -> torch.Tensor:
    return relevance[:, feature].abs() / relevance.abs().sum(1)


# ---------------------------------------------------------------- k-means


@pytest.fixture(scope="module")
def kmeans_case():
    x, _ = _blobs(0, informative=2)
    x = np.concatenate([x, np.random.default_rng(1).normal(size=(80, 6)) + [0, 0, -4, 0, 0, 0]])
    return KMeans(3, n_init=4, random_state=0).fit(x), x


def test_kmeans_logits_match_the_clustering(kmeans_case):
    km, x = kmeans_case
    net = neuralize(km)
    logits = net(torch.as_tensor(x)).detach().numpy()
    assert (logits.argmax(1) == km.predict(x)).all()
    d = km.transform(x) ** 2  # squared distances to the centroids
    for c in range(3):
        others = np.delete(d, c, axis=1)
        np.testing.assert_allclose(logits[:, c], others.min(1) - d[:, c], rtol=1e-9, atol=1e-9)
    assert ((logits > 0).sum(1) == 1).all()


def test_neon_equals_the_per_sample_reference_and_sums_to_the_logit(kmeans_case):
    km, x = kmeans_case
    net = neuralize(km, beta=0.3)
    xt = torch.as_tensor(x[:40])
    for target in (torch.as_tensor(km.predict(x[:40])), torch.full((40,), 1)):
        relevance = lrp_core.attribute(net, xt, target)
        logits = net(xt).gather(1, target[:, None])[:, 0]
        torch.testing.assert_close(relevance.sum(1), logits.detach(), rtol=1e-9, atol=1e-9)
        for b in range(40):
            expected, logit = lrp_reference.neon_kmeans(km.cluster_centers_, x[b], int(target[b]), beta=0.3)
            np.testing.assert_allclose(relevance[b].numpy(), expected, rtol=1e-6, atol=1e-9)


def test_kmeans_relevance_goes_to_the_separating_feature(kmeans_case):
    km, x = kmeans_case
    net = neuralize(km)
    relevance = lrp_core.attribute(net, torch.as_tensor(x), torch.as_tensor(km.predict(x)))
    assert _share(relevance, 2).median() > 0.8
    assert relevance.sum(1).min() > 0  # assigned clusters have positive logits: positive evidence


# ---------------------------------------------------------------- SVC


@pytest.fixture(scope="module")
def svc_case():
    x, y = _blobs(2, n=200, informative=0, shift=3.0)
    x[:, 1:] *= 0.5
    model = SVC(gamma=0.1, C=1.0).fit(x, y)
    test, _ = _blobs(3, n=60, informative=0, shift=3.0)
    test[:, 1:] *= 0.5
    return model, test


def _log_ratio(model: SVC, x: np.ndarray) -> np.ndarray:
    """``log((S+ + b+) / (S- + b-)) / gamma`` straight from scikit-learn's kernel."""
    k = rbf_kernel(x, model.support_vectors_, gamma=model._gamma)
    coef = model.dual_coef_[0]
    b = model.intercept_[0]
    pos = k[:, coef > 0] @ coef[coef > 0] + max(b, 0)
    neg = k[:, coef < 0] @ -coef[coef < 0] + max(-b, 0)
    return np.log(pos / neg) / model._gamma


def test_svc_output_has_the_decision_function_sign(svc_case):
    model, test = svc_case
    net = neuralize(model)
    g = net(torch.as_tensor(test))[:, 0].detach().numpy()
    np.testing.assert_allclose(g, _log_ratio(model, test), rtol=1e-9, atol=1e-9)
    assert (np.sign(g) == np.sign(model.decision_function(test))).all()
    assert ((g > 0) == (model.predict(test) == model.classes_[1])).all()


@pytest.mark.parametrize("intercept", ["fitted", "negative", "zero"])
def test_svc_relevance_equals_the_reference_and_sums_to_g(svc_case, intercept):
    model, test = svc_case
    coef = model.dual_coef_[0]
    b = {"fitted": model.intercept_[0], "negative": -0.4, "zero": 0.0}[intercept]
    net = NeuralizedSVC(model.support_vectors_, coef, b, model._gamma)
    xt = torch.as_tensor(test[:25])
    relevance = lrp_core.attribute(net, xt, 0)
    g = net(xt)[:, 0].detach()
    torch.testing.assert_close(relevance.sum(1), g, rtol=1e-8, atol=1e-9)
    sv = model.support_vectors_
    for i in range(25):
        expected, g_ref = lrp_reference.svc(
            sv[coef > 0], coef[coef > 0], sv[coef < 0], -coef[coef < 0], b, model._gamma, test[i]
        )
        assert g_ref == pytest.approx(float(g[i]), rel=1e-9, abs=1e-9)
        np.testing.assert_allclose(relevance[i].numpy(), expected, rtol=1e-6, atol=1e-8)


def test_svc_relevance_goes_to_the_separating_feature(svc_case):
    model, test = svc_case
    relevance = lrp_core.attribute(neuralize(model), torch.as_tensor(test), 0)
    assert _share(relevance, 0).median() > 0.6
    # the sign follows the decision: feature 0 is evidence for the side the point is on
    g = neuralize(model)(torch.as_tensor(test))[:, 0].detach()
    assert ((relevance[:, 0] > 0) == (g > 0)).double().mean() > 0.95


# ---------------------------------------------------------------- one-class SVM


@pytest.fixture(scope="module")
def one_class_case():
    rng = np.random.default_rng(4)
    inliers = rng.normal(size=(300, 5))
    model = OneClassSVM(gamma=0.1, nu=0.05).fit(inliers)
    outliers = rng.normal(size=(40, 5))
    outliers[:, 3] += 6.0  # anomalous in feature 3 only
    return model, rng.normal(size=(40, 5)), outliers


def test_one_class_score_reproduces_the_decision_function(one_class_case):
    model, inliers, outliers = one_class_case
    net = neuralize(model)
    x = np.concatenate([inliers, outliers])
    score = net(torch.as_tensor(x))[:, 0].detach()
    np.testing.assert_allclose(net.decision_function(score).numpy(), model.decision_function(x), atol=1e-10)
    assert ((score.numpy() > net.threshold) == (model.predict(x) == -1)).all()
    assert (score >= 0).all()


def test_one_class_relevance_equals_reference_and_points_at_the_anomaly(one_class_case):
    model, inliers, outliers = one_class_case
    net = neuralize(model)
    x = torch.as_tensor(outliers)
    relevance = lrp_core.attribute(net, x, 0)
    score = net(x)[:, 0].detach()
    torch.testing.assert_close(relevance.sum(1), score, rtol=1e-9, atol=1e-9)
    for i in range(10):
        expected, s = lrp_reference.one_class_svm(
            model.support_vectors_, model.dual_coef_[0], model._gamma, outliers[i]
        )
        assert s == pytest.approx(float(score[i]), rel=1e-9)
        np.testing.assert_allclose(relevance[i].numpy(), expected, rtol=1e-6, atol=1e-9)
    # OC-DTD shares each unit's distance, so the other features keep their part of the distance to the nearest
    # support vectors; feature 3 still carries most of it for nearly every outlier (uniform would be 0.2)
    assert _share(relevance, 3).median() > 0.5
    assert (relevance.abs().argmax(1) == 3).double().mean() > 0.9
    # inliers carry far less outlier evidence on that feature
    inlier_relevance = lrp_core.attribute(net, torch.as_tensor(inliers), 0)
    assert inlier_relevance[:, 3].median() < 0.2 * relevance[:, 3].median()


def test_input_on_a_support_vector_keeps_relevance_conserved(one_class_case):
    model, _, _ = one_class_case
    net = neuralize(model)
    x = torch.as_tensor(model.support_vectors_[:5])  # zero distance to a centre: shares fall back to flat
    relevance = lrp_core.attribute(net, x, 0)
    assert torch.isfinite(relevance).all()
    torch.testing.assert_close(relevance.sum(1), net(x)[:, 0].detach(), rtol=1e-8, atol=1e-9)


# ---------------------------------------------------------------- errors and options


def test_unsupported_estimators_and_inputs_raise_clearly(svc_case):
    x, y = _blobs(5, n=60)
    y3 = np.arange(60) % 3
    with pytest.raises(ValueError, match="binary SVCs; this one has 3 classes"):
        neuralize(SVC().fit(x, y3))
    with pytest.raises(ValueError, match="only the RBF kernel.*kernel='linear'"):
        neuralize(SVC(kernel="linear").fit(x, y))
    with pytest.raises(ValueError, match="KMeans has no cluster_centers_: fit it first"):
        neuralize(KMeans(2))
    with pytest.raises(TypeError, match="cannot neuralize a LinearRegression"):
        from sklearn.linear_model import LinearRegression

        neuralize(LinearRegression().fit(x, y))
    model, _ = svc_case
    with pytest.raises(ValueError, match=r"expects inputs of shape \(batch, 6\); got \(3, 4\)"):
        lrp_core.attribute(neuralize(model), torch.zeros(3, 4, dtype=torch.double), 0)
    with pytest.raises(ValueError, match=r"holds float64 centres but the input is torch.float32"):
        lrp_core.attribute(neuralize(model), torch.zeros(3, 6), 0)
    wrong = composites.EpsilonPlus(layer_map=[(nn.Module, rules.Epsilon())])
    with pytest.raises(UnsupportedLayerError, match="needs its rule from lrp_core.rules"):
        lrp_core.attribute(neuralize(model), torch.zeros(3, 6, dtype=torch.double), 0, composite=wrong)


def test_beta_controls_how_many_competitors_share_the_relevance(kmeans_case):
    km, x = kmeans_case
    xt = torch.as_tensor(x[:50])
    target = torch.as_tensor(km.predict(x[:50]))
    hard = lrp_core.attribute(NeuralizedKMeans(km.cluster_centers_, beta=float("inf")), xt, target)
    for b in range(5):
        expected, _ = lrp_reference.neon_kmeans(km.cluster_centers_, x[b], int(target[b]), beta=1e6)
        np.testing.assert_allclose(hard[b].numpy(), expected, rtol=1e-6, atol=1e-9)
    override = composites.EpsilonPlus(layer_map=[(lrp_core.neuralized.Pool, rules.PoolShare(beta=0.3))])
    soft = lrp_core.attribute(NeuralizedKMeans(km.cluster_centers_, beta=5.0), xt, target, composite=override)
    torch.testing.assert_close(soft, lrp_core.attribute(NeuralizedKMeans(km.cluster_centers_, beta=0.3), xt, target))


def test_float32_and_plain_arrays_work():
    rng = np.random.default_rng(6)
    centers = rng.normal(size=(4, 3))
    net = NeuralizedKMeans(centers).float()
    x = torch.randn(8, 3)
    relevance = lrp_core.attribute(net, x, net(x).argmax(1))
    assert relevance.dtype == torch.float32
    torch.testing.assert_close(relevance.sum(1), net(x).amax(1).detach(), rtol=1e-4, atol=1e-4)
    one_class = NeuralizedOneClassSVM(centers, [0.5, 1.0, 0.25, 0.25], gamma=0.5, rho=0.3)
    assert one_class(torch.as_tensor(centers)).shape == (4, 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu(kmeans_case, svc_case, one_class_case):
    km, x = kmeans_case
    model, test = svc_case
    one_class, _, outliers = one_class_case
    for estimator, inputs in ((km, x), (model, test), (one_class, outliers)):
        net = neuralize(estimator)
        xt = torch.as_tensor(inputs)
        target = net(xt).argmax(1)
        cpu = lrp_core.attribute(net, xt, target)
        gpu = lrp_core.attribute(net.cuda(), xt.cuda(), target.cuda())
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-9, atol=1e-10)
