"""Check a layer you wrote yourself: forward/backward by hand, then minivae.gradcheck.

    python examples/check_your_own_layer.py

The layer is Swish with a learned slope, out = x * sigmoid(beta * x) (Ramachandran, Zoph and
Le, "Searching for activation functions", 2017). check_layer builds the scalar
L = sum(G * out) for a fixed random G, compares backward(params, G, cache) with Ridders-
extrapolated finite differences for x and every parameter, and checks that backward is linear
in G and leaves its inputs alone. The second half plants a bug and shows the report that names
it. Exits 1 if the correct layer fails or the buggy one passes.
"""
import sys

import numpy as np

from minivae.engine.threads import one_blas_thread
from minivae.gradcheck import check_layer


class Swish:
    """out = x * sigmoid(beta * x);  x: (B, D) -> out: (B, D);  params: {"beta": (1,)}."""

    def forward(self, params, x):
        s = 1.0 / (1.0 + np.exp(-params["beta"] * x))
        return x * s, (x, s)

    def backward(self, params, dout, cache):
        x, s = cache
        ds = dout * x * s * (1.0 - s)           # dL/d(beta x)
        dx = dout * s + ds * params["beta"]     # d out/dx = s + beta x s (1 - s)
        dbeta = np.sum(ds * x).reshape(1)       # d out/dbeta = x^2 s (1 - s)
        return dx, {"beta": dbeta}


class SwishForgotBeta(Swish):
    """The classic slip: the chain rule through beta * x forgets the factor beta."""

    def backward(self, params, dout, cache):
        x, s = cache
        ds = dout * x * s * (1.0 - s)
        return dout * s + ds, {"beta": np.sum(ds * x).reshape(1)}


def main():
    rng = np.random.default_rng(0)
    params = {"beta": np.array([1.5])}
    x = rng.standard_normal((4, 5))

    with one_blas_thread():   # the thread policy of every minivae command (minivae.engine.threads)
        report = check_layer(Swish(), params, x, name="Swish")
        print(report, "\n")
        buggy = check_layer(SwishForgotBeta(), params, x, name="SwishForgotBeta")
        print(buggy)
    return 0 if report.passed and not buggy.passed else 1


if __name__ == "__main__":
    sys.exit(main())
