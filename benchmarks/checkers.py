#!/usr/bin/env python
"""Gradient checkers side by side: minivae.gradcheck (each mode), torch.autograd.gradcheck
(slow and fast mode) and jax.test_util.check_grads, on the same planted-bug and correct cases.

    python benchmarks/checkers.py                 # the table
    python benchmarks/checkers.py --save          # also benchmarks/results/checkers.{json,md}
    python benchmarks/checkers.py --only kink     # cases whose name contains "kink"

Every case is a scalar function f of named NumPy tensors and an analytic gradient for it
(correct, or with a planted bug). Each checker sees it the way a user would hand it a
hand-written backward: minivae gets f and the gradient; PyTorch gets a torch.autograd.Function
whose forward calls f and whose backward returns the analytic gradient; JAX gets a
jax.custom_vjp function whose forward and backward call the same code through
jax.pure_callback. float64 unless the case says float32 (jax_enable_x64 is on).

Per checker and case: the verdict (pass / FAIL / refused: an error before any verdict;
minivae's "FAIL (unresolved)" is a FAIL whose every failed item was too noisy to judge, which
its report says, with "check in float64"; it counts as a FAIL, and a false alarm where the
gradient is correct),
whether it is right (a planted bug must not pass; a correct gradient should pass), whether a
failing single-element bug is *named* (the checker's report contains the element's index),
and the seconds. Summary: wrong PASSED verdicts, false alarms (a correct gradient failed or
refused), and bugs named. Cases a checker cannot express (a tensor that is not an input) are
marked "n/a"; torch's slow mode and minivae's exact mode (both one element at a time) are not
run where that would take over --slow-limit evaluations of f (2 per element), and that is said.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _machine  # noqa: E402

_machine.set_threads(1, 1)   # one BLAS thread: f is tiny, threads would only spin

import numpy as np  # noqa: E402

import minivae  # noqa: E402
from minivae import VAE, layers, sampling  # noqa: E402
from minivae.gradcheck import GradcheckError, check_gradients  # noqa: E402

R = np.random.default_rng


class Case:
    """f(d) -> float for a dict d of arrays; grad(d) -> dict of arrays (the analytic side).
    bug: "" for a correct gradient, else what was planted; where: the wrong element
    (tensor, index) for a single-element bug."""

    def __init__(self, name, tensors, f, grad, bug="", where=None, note="", minivae_only=False,
                 analytic=None):
        self.name, self.tensors, self.f, self.grad = name, tensors, f, grad
        self.bug, self.where, self.note, self.minivae_only = bug, where, note, minivae_only
        self.analytic = analytic   # given explicitly when it is not grad(tensors)


def vae_case(name, model, x, keys, bug="", patch=None, scale=None, where=None):
    """A VAE's loss (eps fixed) as a function of some of its parameter tensors."""
    eps = model.draw_eps(x.shape[0])
    views = model.params.views
    orig = {k: views[k].copy() for k in keys}

    def load(d):
        for k in keys:
            if d[k] is not views[k]:
                views[k][...] = d[k]

    def f(d):
        load(d)
        v = float(model.loss_and_grads(x, eps, check=False).loss)
        load(orig)
        return v

    def grad(d):
        load(d)
        restore = patch() if patch else None
        try:
            model.loss_and_grads(x, eps)
        finally:
            if restore:
                restore()
        g = {k: model.params.grad_views[k].astype(np.float64).copy() for k in keys}
        load(orig)
        if scale:
            k, factor = scale
            g[k] = g[k] * factor
        if where:
            k, i = where
            g[k][i] += 0.5
        return g

    return Case(name, {k: views[k] for k in keys}, f, grad, bug=bug, where=where)


def wrong_sampler():
    def wrong(dz, cache):
        sigma, eps = cache
        ds = dz * sigma * sigma
        return dz, ds * eps * 0.5, ds
    import minivae.models as mm
    old = mm.sample_backward
    mm.sample_backward = wrong
    return lambda: setattr(mm, "sample_backward", old)


def no_bias_grad():
    original = layers.Dense.backward

    def nb(self, params, dout, cache):
        dx, g = original(self, params, dout, cache)
        g["b"] = g["b"] * 0.0
        return dx, g
    layers.Dense.backward = nb
    return lambda: setattr(layers.Dense, "backward", original)


def cases():
    out = []
    # 1. f redraws its noise on every call
    r = R(1)
    out.append(Case("noise redrawn in f", {"mu": np.zeros(1000)},
                    lambda d: float(np.sum((d["mu"] + r.standard_normal(1000)) ** 2)),
                    lambda d: {"mu": np.full(1000, 123.0)}, bug="f not deterministic"))
    # 2. inputs on kinks
    x = R(0).standard_normal(1000)
    x[::50] = 0.0
    leaky = lambda d: float(np.sum(np.where(d["x"] > 0, d["x"], 0.1 * d["x"])))  # noqa: E731
    out.append(Case("kinks, gradient 7 everywhere", {"x": x}, leaky,
                    lambda d: {"x": np.full(1000, 7.0)}, bug="wrong everywhere"))
    out.append(Case("kinks, correct (leaky ReLU)", {"x": x.copy()}, leaky,
                    lambda d: {"x": np.where(d["x"] > 0, 1.0, 0.1)}))
    # 3. non-contiguous tensor
    w = R(0).standard_normal((4, 3)).T
    cube = lambda d: float(np.sum(d["w"] ** 3))  # noqa: E731
    out.append(Case("transposed w, correct", {"w": w}, cube, lambda d: {"w": 3 * d["w"] ** 2}))
    out.append(Case("transposed w, zero gradient", {"w": w.copy().T.copy().T}, cube,
                    lambda d: {"w": 0 * d["w"]}, bug="zero gradient"))
    # 4. an analytic gradient for a tensor that is not checked
    out.append(Case("extra analytic key", {"w": w.copy()}, lambda d: float(np.sum(d["w"] ** 2)),
                    lambda d: {"w": 2 * d["w"], "v": np.ones(3)}, bug="gradient for a non-input",
                    minivae_only=True))
    # 5. float32
    m = VAE(seed=0, dtype="float32")
    xb = R(0).uniform(size=(8, 784)).astype(np.float32)
    out.append(vae_case("f32 784-400-20 VAE, dec bias x1.3", m, xb, ["dec.2.b"],
                        bug="30% wrong", scale=("dec.2.b", 1.3)))
    out.append(vae_case("f32 784-400-20 VAE, dec bias correct", m, xb, ["dec.2.b"]))
    for s in (1, 3):
        sm = VAE(40, (30,), 5, seed=s, dtype="float32")
        out.append(vae_case(f"f32 VAE(40,(30,),5) seed {s}, correct", sm,
                            R(s).uniform(size=(8, 40)).astype(np.float32), list(sm.params.views)))
    # 6. scale far from 1
    p = R(0).uniform(1e-3, 1e-2, 50)
    out.append(Case("log(p), p in [1e-3, 1e-2]", {"p": p}, lambda d: float(np.sum(np.log(d["p"]))),
                    lambda d: {"p": 1 / d["p"]}))
    xs = R(0).uniform(900, 1100, 50)
    out.append(Case("sin(x), x in [900, 1100]", {"x": xs}, lambda d: float(np.sum(np.sin(d["x"]))),
                    lambda d: {"x": np.cos(d["x"])}))
    # 7. one wrong element in a 784x400 weight
    rr = R(0)
    W, xx, G = rr.standard_normal((784, 400)) * 0.05, rr.uniform(size=(8, 784)), rr.standard_normal((8, 400))

    def bad_dense(d):
        g = xx.T @ G
        g[500, 399] += 0.5
        return {"W": g}
    out.append(Case("784x400 weight, one element +0.5", {"W": W},
                    lambda d: float(np.sum((xx @ d["W"]) * G)), bad_dense, bug="one element",
                    where=("W", (500, 399))))
    # tight float64 bug, small tensor
    A, C = R(2).standard_normal((20, 20)), R(3).standard_normal((20, 20))

    def tight(d):
        g = 2 * C * d["A"]
        g[7, 3] *= 1 + 3e-6
        return {"A": g}
    out.append(Case("20x20 quadratic, one element x(1+3e-6)", {"A": A},
                    lambda d: float(np.sum(C * d["A"] ** 2)), tight, bug="3e-6 relative",
                    where=("A", (7, 3))))
    out.append(Case("20x20 quadratic, correct", {"A": A.copy()},
                    lambda d: float(np.sum(C * d["A"] ** 2)), lambda d: {"A": 2 * C * d["A"]}))
    # refusals and odd inputs
    out.append(Case("float16 input", {"h": np.linspace(0.5, 1.5, 8).astype(np.float16)},
                    lambda d: float(np.sum(d["h"].astype(np.float64) ** 2)),
                    lambda d: {"h": 2 * d["h"].astype(np.float64)}, note="refusal is right"))
    xd = np.array([0.3, 1.0])
    out.append(Case("jump next to x[0]", {"x": xd},
                    lambda d: float(np.sum(d["x"]) + (d["x"][0] > 0.3 + 1e-9)),
                    lambda d: {"x": np.ones(2)}, bug="f jumps at x"))
    # kinks exactly at x, small
    xr = np.array([0.0, 1.0, -1.0, 2.0])
    relu = lambda d: float(np.sum(np.maximum(d["x"], 0.0) * np.array([1.0, 2.0, 3.0, 4.0])))  # noqa: E731
    out.append(Case("ReLU at 0, subgradient 0", {"x": xr}, relu,
                    lambda d: {"x": np.array([0.0, 2.0, 0.0, 4.0])}))
    out.append(Case("ReLU at 0, gradient 5 there", {"x": xr.copy()}, relu,
                    lambda d: {"x": np.array([5.0, 2.0, 0.0, 4.0])}, bug="wrong at the kink",
                    where=("x", (0,))))
    # found by a new user's attack on an earlier version of minivae's checker
    xl = np.array([1e-8, 0.5, 2.0])
    out.append(Case("log(x), x[0] = 1e-8 beside 0.5, 10% wrong", {"x": xl},
                    lambda d: float(np.sum(np.log(d["x"]))),
                    lambda d: {"x": np.array([1.1e8, 2.0, 0.5])}, bug="10% wrong", where=("x", (0,))))
    xa = np.array([1e-12, 1.0, 0.5])
    out.append(Case("abs(x) at x[0] = 1e-12, sign flipped", {"x": xa},
                    lambda d: float(np.sum(np.abs(d["x"]))),
                    lambda d: {"x": np.array([-1.0, 1.0, 1.0])}, bug="wrong sign", where=("x", (0,))))
    # beside a kink, not on it: a correct ReLU there read "unresolved" until 2026-12-01
    xk = R(4).standard_normal(12)
    xk[:3] = [1e-10, -1e-10, 3e-10]
    wk = R(5).standard_normal(12)
    relu_w = lambda d: float(np.sum(wk * np.maximum(d["x"], 0.0)))  # noqa: E731
    out.append(Case("ReLU, inputs 1e-10 from 0, correct", {"x": xk}, relu_w,
                    lambda d: {"x": wk * (d["x"] > 0)}))
    out.append(Case("ReLU, inputs 1e-10 from 0, threshold 1e-3", {"x": xk.copy()}, relu_w,
                    lambda d: {"x": wk * (d["x"] > 1e-3)}, bug="0 where 0 < x < 1e-3"))
    xt = np.array([1.0, 1.0, 0.5])
    out.append(Case("max with a tie, gradient to both", {"x": xt}, lambda d: float(np.max(d["x"])),
                    lambda d: {"x": np.array([1.0, 1.0, 0.0])}, bug="double counted"))
    out.append(Case("max with a tie, gradient to one", {"x": xt.copy()},
                    lambda d: float(np.max(d["x"])), lambda d: {"x": np.array([1.0, 0.0, 0.0])}))
    a9 = np.array([1e-9])
    out.append(Case("a^3 at a = 1e-9", {"a": a9}, lambda d: float(d["a"][0] ** 3),
                    lambda d: {"a": 3 * d["a"] ** 2}))
    # planted bugs in a small float64 VAE
    mk = lambda: VAE(12, (10,), 3, dtype="float64", seed=3)  # noqa: E731
    xv = R(1).uniform(size=(5, 12))
    out.append(vae_case("VAE f64, correct", mk(), xv, ["enc.2.W", "enc.2.b", "dec.2.b"]))
    out.append(vae_case("VAE f64, sampler scale exp(logvar)", mk(), xv, ["enc.2.W", "enc.2.b"],
                        bug="sampler backward", patch=wrong_sampler))
    out.append(vae_case("VAE f64, bias gradients dropped", mk(), xv, ["dec.2.b"],
                        bug="bias gradient 0", patch=no_bias_grad))
    big = VAE(seed=0, dtype="float64")
    out.append(vae_case("VAE f64 784-400-20, correct", big, R(4).uniform(size=(4, 784)),
                        ["enc.2.b", "dec.2.b"]))
    out.append(vae_case("VAE f64 784-400-20, one dec bias +0.5", big, R(4).uniform(size=(4, 784)),
                        ["dec.2.b"], bug="one element", where=("dec.2.b", (300,))))
    return out


# -- the checkers ----------------------------------------------------------------------------


def run_minivae(case, mode):
    t = {k: v for k, v in case.tensors.items()}
    analytic = case.grad(t)
    rep = check_gradients(lambda: case.f(t), t, analytic, mode=mode)
    named = None
    if case.where and not rep.passed:
        k, i = case.where
        named = any(c.name == k and c.worst_index == tuple(i) for c in rep.failed)
    # FAIL (unresolved): every failed item was one f's noise left too coarse to judge; the
    # report says so and to check in float64, but its verdict is still not a pass
    unresolved = not rep.passed and all(c.n_failed and c.n_failed == c.n_unresolved
                                        for c in rep.failed)
    return ("pass" if rep.passed else "FAIL (unresolved)" if unresolved else "FAIL"), named, \
        rep.table()


def run_torch(case, fast):
    import torch
    names = list(case.tensors)

    class Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *ts):
            ctx.save_for_backward(*ts)
            d = dict(zip(names, (t.detach().numpy() for t in ts)))
            return torch.tensor(case.f(d), dtype=ts[0].dtype)

        @staticmethod
        def backward(ctx, gout):
            d = dict(zip(names, (t.detach().numpy() for t in ctx.saved_tensors)))
            g = case.grad(d)
            return tuple(torch.as_tensor(np.asarray(g[k], dtype=d[k].dtype)) * gout for k in names)

    ins = tuple(torch.tensor(np.array(case.tensors[k]), requires_grad=True) for k in names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ok = torch.autograd.gradcheck(Fn.apply, ins, fast_mode=fast, raise_exception=True)
            msg = ""
        except _torch_gradcheck_error() as e:
            ok, msg = False, str(e)
    return ("pass" if ok else "FAIL"), _named(case, msg, ok), msg[:300]


def _torch_gradcheck_error():
    import importlib
    return importlib.import_module("torch.autograd.gradcheck").GradcheckError


def run_jax(case):
    import jax
    import jax.numpy as jnp
    from jax.test_util import check_grads
    names = list(case.tensors)
    dts = [np.asarray(case.tensors[k]).dtype for k in names]
    shapes = [np.asarray(case.tensors[k]).shape for k in names]

    def host_f(*arrs):
        return np.asarray(case.f(dict(zip(names, (np.asarray(a) for a in arrs)))), dtype=dts[0])

    def host_g(*arrs):
        g = case.grad(dict(zip(names, (np.asarray(a) for a in arrs))))
        return tuple(np.asarray(g[k], dtype=dt) for k, dt in zip(names, dts))

    @jax.custom_vjp
    def fn(*arrs):
        return jax.pure_callback(host_f, jax.ShapeDtypeStruct((), dts[0]), *arrs)

    def fwd(*arrs):
        return fn(*arrs), arrs

    def bwd(arrs, gout):
        gs = jax.pure_callback(host_g, tuple(jax.ShapeDtypeStruct(s, d) for s, d in zip(shapes, dts)), *arrs)
        return tuple(g * gout for g in gs)

    fn.defvjp(fwd, bwd)
    args = tuple(jnp.asarray(np.array(case.tensors[k])) for k in names)
    try:
        check_grads(fn, args, order=1, modes=("rev",))
        return "pass", None, ""
    except AssertionError as e:
        return "FAIL", _named(case, str(e), False), str(e)[:300]


def _named(case, msg, ok):
    """Does a failure message contain the wrong element's index?"""
    if ok or not case.where:
        return None
    i = case.where[1]
    forms = {str(tuple(i)), str(list(i)), ", ".join(map(str, i)), ",".join(map(str, i))}
    return any(f"[{s}]" in msg or f"({s})" in msg for s in forms)


def run(checker, case, slow_limit):
    if case.minivae_only and not checker.startswith("minivae"):
        return dict(verdict="n/a", named=None, seconds=None, detail="not expressible")
    evals = 2 * sum(int(np.size(v)) for v in case.tensors.values())
    if checker in ("torch slow", "minivae exact") and evals > slow_limit:
        return dict(verdict="not run", named=None, seconds=None,
                    detail=f"one element at a time: at least {evals} evaluations of f")
    t0 = time.perf_counter()
    try:
        if checker.startswith("minivae"):
            verdict, named, detail = run_minivae(case, checker.split()[1])
        elif checker.startswith("torch"):
            verdict, named, detail = run_torch(case, fast=checker == "torch fast")
        else:
            verdict, named, detail = run_jax(case)
    except (GradcheckError, TypeError, ValueError, RuntimeError) as e:
        verdict, named, detail = "refused", None, f"{type(e).__name__}: {e}"[:300]
    except Exception as e:  # noqa: BLE001  (a crash is recorded, not hidden)
        verdict, named, detail = "error", None, f"{type(e).__name__}: {e}"[:300]
    return dict(verdict=verdict, named=named, seconds=time.perf_counter() - t0, detail=detail)


def right(case, verdict):
    if verdict in ("n/a", "not run"):
        return None
    if case.bug:
        return verdict != "pass"
    return verdict == "pass" or (verdict == "refused" and "refusal is right" in case.note)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--save", action="store_true", help="write benchmarks/results/checkers.{json,md}")
    ap.add_argument("--only", default="", help="run only cases whose name contains this")
    ap.add_argument("--slow-limit", type=int, default=20000,
                    help="largest number of f evaluations torch's slow mode may take per case")
    args = ap.parse_args(argv)
    checkers = ["minivae auto", "minivae exact", "minivae directions", "minivae sparse"]
    have = {}
    try:
        import torch
        torch.set_num_threads(1)
        have["torch"] = torch.__version__
        checkers += ["torch slow", "torch fast"]
    except ImportError:
        print("torch not installed: its columns are left out")
    try:
        import jax
        jax.config.update("jax_enable_x64", True)
        have["jax"] = jax.__version__
        checkers += ["jax"]
    except ImportError:
        print("jax not installed: its column is left out")
    info = _machine.machine_info()
    _machine.print_machine(info)
    rows = []
    for case in cases():
        if args.only and args.only not in case.name:
            continue
        row = {"case": case.name, "bug": case.bug or "none", "results": {}}
        for ch in checkers:
            res = run(ch, case, args.slow_limit)
            res["right"] = right(case, res["verdict"])
            row["results"][ch] = res
        rows.append(row)
        print(f"{case.name:<42}" + "  ".join(f"{_cell(row['results'][c]):>16}" for c in checkers), flush=True)
    summary = {}
    for ch in checkers:
        rs = [(r, r["results"][ch]) for r in rows]
        summary[ch] = dict(
            wrong_passed=sum(x["verdict"] == "pass" and r["bug"] != "none" for r, x in rs),
            false_alarms=sum(x["right"] is False and r["bug"] == "none" for r, x in rs),
            unresolved=sum(x["verdict"] == "FAIL (unresolved)" for r, x in rs),
            named=sum(bool(x["named"]) for r, x in rs),
            single_element_bugs=sum(x["named"] is not None for r, x in rs),
            not_run=sum(x["verdict"] in ("n/a", "not run") for r, x in rs),
            seconds=sum(x["seconds"] or 0.0 for r, x in rs))
    md = _markdown(rows, checkers, summary)
    print("\n" + md)
    if args.save:
        _machine.save("checkers.json", {"machine": info, "versions": {"minivae": minivae.__version__, **have},
                                   "checkers": checkers, "rows": rows, "summary": summary})
        (_machine.RESULTS / "checkers.md").write_text(md + "\n")
        print(f"wrote {_machine.RESULTS / 'checkers.json'} and checkers.md")


def _cell(res):
    v = res["verdict"]
    mark = {True: "", False: " (wrong)", None: ""}[res["right"]]
    if res["named"]:
        mark += " named"
    s = f" {res['seconds']:.2f}s" if res["seconds"] is not None else ""
    return f"{v}{mark}{s}"


def _markdown(rows, checkers, summary):
    head = "| case | planted bug | " + " | ".join(checkers) + " |"
    sep = "|" + "---|" * (2 + len(checkers))
    lines = [head, sep]
    for r in rows:
        cells = []
        for c in checkers:
            x = r["results"][c]
            v = x["verdict"]
            if x["right"] is False:
                v = f"**{v}** (wrong)"
            if x["named"]:
                v += ", named"
            if x["seconds"] is not None:
                v += f", {x['seconds']:.2f} s"
            cells.append(v)
        lines.append(f"| {r['case']} | {r['bug']} | " + " | ".join(cells) + " |")
    lines.append("| **wrong PASSED** | | " + " | ".join(str(summary[c]["wrong_passed"]) for c in checkers) + " |")
    lines.append("| **false alarms** | | " + " | ".join(str(summary[c]["false_alarms"]) for c in checkers) + " |")
    lines.append("| FAIL (unresolved) verdicts | | " + " | ".join(str(summary[c]["unresolved"]) for c in checkers) + " |")
    lines.append("| **single wrong element named** | | " + " | ".join(
        f"{summary[c]['named']} of {summary[c]['single_element_bugs']}" for c in checkers) + " |")
    lines.append("| **seconds, all cases** | | " + " | ".join(f"{summary[c]['seconds']:.1f}" for c in checkers) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
