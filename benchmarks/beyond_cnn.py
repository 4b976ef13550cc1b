"""LRP beyond CNNs: batched lrp_core against the per-sample reference implementations (tests/lrp_reference.py).

    .venv/bin/python benchmarks/beyond_cnn.py                  # CPU
    python3 benchmarks/beyond_cnn.py --device cuda             # batched on the GPU, references on the CPU

For an LSTM, a GRU, k-means (NEON), a binary RBF SVC and a one-class SVM it times ``lrp_core.attribute`` on a
batch and the numpy step-by-step reference sample by sample, checks that both give the same maps on the
reference's samples, and prints JSON: samples/s of each and their ratio (``speedup``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.svm import SVC, OneClassSVM
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import lrp_reference  # noqa: E402

import lrp_core  # noqa: E402
from lrp_core import composites  # noqa: E402
from lrp_core.neuralized import neuralize  # noqa: E402
from lrp_core.sequence_demo import LastStep  # noqa: E402

EPS = 1e-9


def _timed(fn, sync, repeats: int = 1) -> tuple[float, object]:
    """Best wall time of ``repeats`` calls, and the last result."""
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        result = fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best, result


def _recurrent_case(kind: str, args, device, sync) -> dict:
    torch.manual_seed(0)
    rnn_type, layer_fn = {"lstm": (nn.LSTM, lrp_reference.lstm_layer), "gru": (nn.GRU, lrp_reference.gru_layer)}[kind]
    features, hidden, length, classes = 32, args.hidden, args.length, 5
    model = LastStep(rnn_type(features, hidden, batch_first=True), classes).double().eval()
    x = torch.randn(args.sequences, length, features, dtype=torch.double)
    target = torch.randint(0, classes, (args.sequences,))
    composite = composites.EpsilonPlus(epsilon=EPS)
    # the reference reads float64 copies of the parameters, taken before the batched run's dtype conversion
    params = [
        getattr(model.rnn, n + "_l0").detach().numpy().copy() for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    ]
    w, b = model.head.weight.detach().numpy().copy(), model.head.bias.detach().numpy().copy()
    gpu_model = model.to(device, args.dtype)
    gpu_x, gpu_target = x.to(device, args.dtype), target.to(device)
    lrp_core.attribute(gpu_model, gpu_x[:8], gpu_target[:8], composite=composite)  # warm-up
    batched_s, relevance = _timed(
        lambda: lrp_core.attribute(gpu_model, gpu_x, gpu_target, composite=composite), sync, args.repeats
    )

    def reference():
        maps = []
        for i in range(args.reference_samples):
            xi = x[i].numpy()
            _, hs = layer_fn(params, xi, np.zeros((length, hidden)), eps=EPS)
            z = w @ hs[-1] + b
            start = np.zeros_like(z)
            start[int(target[i])] = z[int(target[i])]
            relevance_h = np.zeros((length, hidden))
            relevance_h[-1] = lrp_reference._epsilon_linear(hs[-1], w, z, start, EPS)
            maps.append(layer_fn(params, xi, relevance_h, eps=EPS)[0])
        return np.stack(maps)

    reference_s, expected = _timed(reference, lambda: None)
    n_ref = args.reference_samples
    single = _one_at_a_time(
        lambda i: lrp_core.attribute(gpu_model, gpu_x[i : i + 1], gpu_target[i : i + 1], composite=composite),
        4 * n_ref,
        sync,
    )
    return _result(args.sequences, batched_s, n_ref, reference_s, relevance[:n_ref], expected, single) | {
        "shape": f"{args.sequences} x {length} x {features}, hidden {hidden}"
    }


def _one_at_a_time(explain_one, n: int, sync) -> float:
    """Samples/s of lrp_core called on one sample at a time: what batching buys, apart from the reference."""
    seconds, _ = _timed(lambda: [explain_one(i) for i in range(n)], sync)
    return n / seconds


def _result(n, batched_s, n_ref, reference_s, relevance, expected, single_per_s) -> dict:
    batched = n / batched_s
    per_sample = n_ref / reference_s
    diff = float(np.abs(relevance.detach().cpu().numpy() - expected).max())
    return {
        "batched_samples_per_s": round(batched, 1),
        "reference_samples_per_s": round(per_sample, 2),
        "speedup": round(batched / per_sample, 1),
        "lrp_core_one_at_a_time_samples_per_s": round(single_per_s, 1),
        "batching_gain": round(batched / single_per_s, 1),
        "max_abs_diff_vs_reference": diff,
    }


def _kernel_cases(args, device, sync) -> dict:
    rng = np.random.default_rng(0)
    d = args.features
    data = rng.normal(size=(args.fit_samples, d))
    labels = (data[:, 0] + 0.5 * rng.normal(size=len(data)) > 0).astype(int)
    test = rng.normal(size=(args.samples, d))
    xt = torch.as_tensor(test)
    cases = {}

    km = KMeans(args.clusters, n_init=2, random_state=0).fit(data)
    svc = SVC(gamma=1.0 / d, C=1.0).fit(data, labels)
    one_class = OneClassSVM(gamma=1.0 / d, nu=0.1).fit(data)
    n_ref = args.reference_samples
    for name, estimator in (("kmeans", km), ("svc", svc), ("one_class_svm", one_class)):
        net = neuralize(estimator).to(device, args.dtype)
        target = net(xt[:8].to(device, args.dtype)).argmax(1) if name == "kmeans" else 0
        lrp_core.attribute(net, xt[:8].to(device, args.dtype), target)  # warm-up
        gpu_x = xt.to(device, args.dtype)
        target = net(gpu_x).argmax(1) if name == "kmeans" else 0
        batched_s, relevance = _timed(
            lambda net=net, gpu_x=gpu_x, target=target: lrp_core.attribute(net, gpu_x, target), sync, args.repeats
        )
        cpu_target = target.cpu() if isinstance(target, torch.Tensor) else None

        def reference(name=name, estimator=estimator, cpu_target=cpu_target, net=net):
            maps = []
            for i in range(n_ref):
                if name == "kmeans":
                    beta = net.pool.explain_temperature
                    maps.append(
                        lrp_reference.neon_kmeans(estimator.cluster_centers_, test[i], int(cpu_target[i]), beta)[0]
                    )
                elif name == "svc":
                    coef, sv = estimator.dual_coef_[0], estimator.support_vectors_
                    maps.append(
                        lrp_reference.svc(
                            sv[coef > 0], coef[coef > 0], sv[coef < 0], -coef[coef < 0],
                            estimator.intercept_[0], estimator._gamma, test[i],
                        )[0]
                    )  # fmt: skip
                else:
                    maps.append(
                        lrp_reference.one_class_svm(
                            estimator.support_vectors_, estimator.dual_coef_[0], estimator._gamma, test[i]
                        )[0]
                    )
            return np.stack(maps)

        reference_s, expected = _timed(reference, lambda: None)

        def one(i, net=net, gpu_x=gpu_x, target=target):
            return lrp_core.attribute(
                net, gpu_x[i : i + 1], target[i : i + 1] if isinstance(target, torch.Tensor) else 0
            )

        single = _one_at_a_time(one, 16 * n_ref, sync)
        sizes = {
            "kmeans": f"{args.clusters} clusters",
            "svc": f"{len(svc.support_vectors_)} support vectors",
            "one_class_svm": f"{len(one_class.support_vectors_)} support vectors",
        }
        cases[name] = _result(args.samples, batched_s, n_ref, reference_s, relevance[:n_ref], expected, single) | {
            "shape": f"{args.samples} x {d}, {sizes[name]}"
        }
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sequences", type=int, default=256)
    parser.add_argument("--length", type=int, default=40)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--samples", type=int, default=4096, help="inputs explained by the kernel models")
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--fit-samples", type=int, default=600)
    parser.add_argument("--clusters", type=int, default=8)
    parser.add_argument("--reference-samples", type=int, default=8)
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64", help="of the batched run")
    parser.add_argument("--repeats", type=int, default=3, help="batched timings: the best of this many")
    args = parser.parse_args()
    args.dtype = getattr(torch, args.dtype)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    device = torch.device(args.device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(args.dtype),
    }
    for kind in ("lstm", "gru"):
        results[kind] = _recurrent_case(kind, args, device, sync)
    results.update(_kernel_cases(args, device, sync))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
