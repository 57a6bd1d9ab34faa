#!/usr/bin/env python
"""Where one training step of the default VAE spends its time, beside the matrix products.

    python benchmarks/profile_step.py                    # batch 32, 128, 512; one thread
    python benchmarks/profile_step.py --batches 128 --save   # also benchmarks/results/profile_step.json
    python benchmarks/profile_step.py --threads 2 --batches 32,128 --save   # profile_step_t2.json

Method: the engine's NumPy step (DataParallel on one thread, minivae's C kernels as installed)
on real MNIST batches, float32, 784-400-20 Bernoulli VAE. First the whole step, the
forward+backward alone and Adam alone (medians over --steps). Then the forward+backward again
with a timer around each of its pieces: the matrix products of each Dense layer (forward, weight
gradient, input gradient), the bias additions and bias gradients, ReLU forward/backward, the
Bernoulli likelihood and its gradient, the sampler and the KL, and the fused bias+ReLU passes
where the compiled kernels run them, with the decoder's last bias counted in the Bernoulli
likelihood that takes it in (engine/numpy_twins.py, FUSE); what is left of the measured
total is the Python between them (calls, dispatch, small allocations, the means). The pieces are
timed on the generic pass (engine/plan.py off: a step plan calls the kernels past the timers);
the whole forward+backward is also timed with and without the plan. The timers
cost about a microsecond each, which lands in that rest.

Then the step as it runs in training, the plan's one compiled call (``Plan.compiled``,
``_kernels.run_plan``) taken apart: that program with only its products (gemm calls) and with
only its kernels, each of its operations alone (warm, repeated: a lower bound for it in the
step, where the caches are colder), the gradient check with Adam (``checked_step``) alone, and the
eps draw alone. What the step takes beyond the program, Adam and the draw is the Python around
them (a few microseconds warm: the thread pinning, the noise stream's snapshot, the means) and
the pieces running colder in the step than alone, where Adam's 18 MB pass has just gone
through the caches. (The products-only and kernels-only programs compute nothing meaningful:
they are timed, then the next step recomputes everything.) One Python thread, so that the numbers
add up: by default one thread in all; with --threads k the batches that minivae does not split
over threads (fewer than MIN_ROWS = 256 rows a thread) run as in training, the products on k
BLAS threads, everything else on the calling thread.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _machine  # noqa: E402


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="32,128,512")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--threads", type=int, default=1,
                   help="minivae's and the BLAS's threads (default 1). With more, a batch too "
                        "small to split over threads (engine/threads.py, MIN_ROWS) still runs "
                        "on one Python thread, its products on the BLAS's threads, so the pieces "
                        "still add up; a batch split over threads is refused")
    p.add_argument("--save", action="store_true",
                   help="write benchmarks/results/profile_step.json (only when given)")
    args = p.parse_args(argv)
    try:
        args.batch_list = [int(b) for b in args.batches.split(",")]
    except ValueError:
        p.error(f"--batches must be whole numbers separated by commas, got {args.batches!r}")
    if any(b < 1 for b in args.batch_list) or args.steps < 1 or args.threads < 1:
        p.error("--batches, --steps and --threads must be >= 1")
    return args


def _median_s(f, steps: int) -> float:
    """The median time of f(i) over i = 0 .. steps - 1, in seconds."""
    import numpy as np

    ts = []
    for i in range(steps):
        t = time.perf_counter()
        f(i)
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def profile(B: int, steps: int, threads: int = 1) -> dict:
    import numpy as np

    from minivae import VAE, Adam, DataParallel, losses
    from minivae.engine import numpy_twins as nt
    from minivae.engine import plan, registry
    from minivae.layers import Dense, ReLU

    model = VAE(seed=0)
    opt = Adam(model.params)
    dp = DataParallel(model, threads=threads)
    xs = [model.backend.asarray(x) for x in _machine.mnist_batches(B, 16)]
    for i in range(10):
        dp.train_step(opt, xs[i % 16], check=False)

    def median_ms(f):
        return _median_s(f, steps) * 1e3

    step = median_ms(lambda i: dp.train_step(opt, xs[i % 16], check=False))
    fb = median_ms(lambda i: dp.loss_and_grads(xs[i % 16], check=False))
    # the pieces below are timed on the generic pass (the step plan calls the kernels
    # straight, past the timers): its total, beside the plan's, is what the plan saves
    plan.ENABLED = False
    fb_generic = median_ms(lambda i: dp.loss_and_grads(xs[i % 16], check=False))

    T = collections.Counter()
    table = registry._BY_BACKEND["numpy"]
    saved = {k: table[k] for k in (Dense.backward, ReLU.forward, ReLU.backward,
                                   losses.Bernoulli.nll, losses.Bernoulli.nll_backward)}
    saved_forward, saved_nt = Dense.forward, {n: getattr(nt, n) for n in
                                              ("sample", "sample_backward", "gaussian_latent",
                                               "gaussian_latent_backward")}
    saved_kl = (nt.losses.kl_normal, nt.losses.kl_normal_backward)
    saved_fused = (nt.matmul, nt.input_grad, nt.kernels.bias_relu, nt.kernels.relu_grad_bias,
                   nt.bernoulli_nll_bias, nt.bernoulli_nll_grad_bias)

    def timed(label, f):
        def run(*a, **k):
            t = time.perf_counter()
            r = f(*a, **k)
            T[label] += time.perf_counter() - t
            return r
        return run

    def dense_forward(self, params, x):
        t0 = time.perf_counter()
        out = np.matmul(x, params["W"])
        t1 = time.perf_counter()
        out += params["b"]
        T["matrix products"] += t1 - t0
        T["bias additions"] += time.perf_counter() - t1
        return out, x

    def dense_backward(layer, params, dout, cache, grads, need_dx, overwrite):
        t0 = time.perf_counter()
        np.matmul(cache.T, dout, out=grads["W"])
        t1 = time.perf_counter()
        np.sum(dout, axis=0, out=grads["b"])
        t2 = time.perf_counter()
        dx = saved_fused[1](dout, params["W"]) if need_dx else None
        T["matrix products"] += (t1 - t0) + (time.perf_counter() - t2)
        T["bias gradients"] += t2 - t1
        return dx

    try:
        Dense.forward = dense_forward
        table[Dense.backward] = dense_backward
        table[ReLU.forward] = timed("ReLU", saved[ReLU.forward])
        table[ReLU.backward] = timed("ReLU", saved[ReLU.backward])
        table[losses.Bernoulli.nll] = timed("Bernoulli likelihood", saved[losses.Bernoulli.nll])
        table[losses.Bernoulli.nll_backward] = timed("Bernoulli likelihood",
                                                     saved[losses.Bernoulli.nll_backward])
        nt.sample = timed("sampler and KL", saved_nt["sample"])
        nt.sample_backward = timed("sampler and KL", saved_nt["sample_backward"])
        nt.gaussian_latent = timed("sampler and KL", saved_nt["gaussian_latent"])
        nt.gaussian_latent_backward = timed("sampler and KL",
                                            saved_nt["gaussian_latent_backward"])
        nt.losses.kl_normal = timed("sampler and KL", saved_kl[0])
        nt.losses.kl_normal_backward = timed("sampler and KL", saved_kl[1])
        # the fused Dense+ReLU passes (numpy_twins.FUSE): their products and their kernels
        nt.matmul = timed("matrix products", saved_fused[0])
        nt.input_grad = timed("matrix products", saved_fused[1])
        nt.kernels.bias_relu = timed("bias + ReLU (fused)", saved_fused[2])
        nt.kernels.relu_grad_bias = timed("ReLU + bias gradient (fused)", saved_fused[3])
        nt.bernoulli_nll_bias = timed("Bernoulli likelihood", saved_fused[4])
        nt.bernoulli_nll_grad_bias = timed("Bernoulli likelihood", saved_fused[5])
        T.clear()
        t0 = time.perf_counter()
        for i in range(steps):
            dp.loss_and_grads(xs[i % 16], check=False)
        timed_total = (time.perf_counter() - t0) / steps * 1e3
    finally:
        plan.ENABLED = True
        Dense.forward = saved_forward
        table.update(saved)
        for n, f in saved_nt.items():
            setattr(nt, n, f)
        nt.losses.kl_normal, nt.losses.kl_normal_backward = saved_kl
        (nt.matmul, nt.input_grad, nt.kernels.bias_relu, nt.kernels.relu_grad_bias,
         nt.bernoulli_nll_bias, nt.bernoulli_nll_grad_bias) = saved_fused
    parts = {k: v / steps * 1e3 for k, v in T.items()}
    parts["Python and the rest"] = timed_total - sum(parts.values())
    return {"batch": B, "step_ms": step, "forward_backward_ms": fb, "adam_ms": step - fb,
            "forward_backward_generic_ms": fb_generic,
            "timed_forward_backward_ms": timed_total,
            "parts_ms": dict(sorted(parts.items(), key=lambda kv: -kv[1])),
            "compiled": compiled_anatomy(model, opt, dp, xs, steps, threads)}


def compiled_anatomy(model, opt, dp, xs, steps, threads):
    """The compiled step plan's pieces (see the module's docstring), or None where the step
    does not run one (no compiled kernels, no NumPy gemm found, a batch split over threads)."""
    import numpy as np

    from minivae.engine import kernels, plan
    from minivae.engine import threads as team
    from minivae.engine.optim import checked_step

    x0 = xs[0]                       # the plan the step made (plan.forward_backward's key)
    made = plan._plans.get(model.params, {}).get((type(model), x0.shape, x0.dtype))
    program = made.compiled() if made is not None else None
    if program is None:
        return None
    prog, sizes = program
    B = made.B
    eps = model.draw_eps(B)
    kl, recon, loss_b = (np.empty(B, dtype=model.dtype) for _ in range(3))
    names = {code: name for name, code in plan._PR.items()}

    def run(ops, i):
        kernels._c.run_plan(ops, sizes, xs[i % 16].reshape(-1), eps.reshape(-1), kl, recon,
                            loss_b, 1.0 / B, model.beta / B, model.beta, threads)

    def median_us(f):
        return _median_s(f, steps) * 1e6

    out = {"step_us": median_us(lambda i: dp.train_step(opt, xs[i % 16], check=False))}
    with team.blas_threads(threads), kernels.parts(threads):
        gemm = prog[:, 0] == plan._PR["gemm"]
        out["program_us"] = median_us(lambda i: run(prog, i))
        out["program_products_only_us"] = median_us(lambda i: run(prog[gemm], i))
        out["program_kernels_only_us"] = median_us(lambda i: run(prog[~gemm], i))
        ops = []
        for k in range(len(prog)):
            row = prog[k]
            label = names[int(row[0])]
            if row[0] == plan._PR["gemm"]:       # words: code, f32, transA, transB, M, N, K
                label += (f" {int(row[4])}x{int(row[6])} @ {int(row[6])}x{int(row[5])}"
                          f" ({'T' if row[2] == plan._TRANS else 'N'}"
                          f"{'T' if row[3] == plan._TRANS else 'N'})")
            ops.append([label, median_us(lambda i: run(prog[k:k + 1], i))])
        out["ops_us"] = ops
        out["adam_checked_us"] = median_us(lambda i: checked_step(opt, threads))
    out["eps_draw_us"] = median_us(lambda i: model.draw_eps(B))
    out["step_beside_program_us"] = out["step_us"] - out["program_us"]
    return out


def main(argv=None) -> int:
    args = parse(argv)
    _machine.set_threads(args.threads)
    from minivae.engine import threads

    batches = args.batch_list
    split = [B for B in batches if min(args.threads, B // threads.MIN_ROWS) > 1]
    if split:
        raise SystemExit(f"profile_step.py: batch {split[0]} would be split over threads "
                         f"(from {threads.MIN_ROWS} rows a thread) and its pieces would not add "
                         f"up: profile it with --threads 1")
    info = _machine.machine_info()
    _machine.print_machine(info)
    rows = []
    for B in batches:
        r = profile(B, args.steps, args.threads)
        rows.append(r)
        print(f"\nbatch {B}: step {r['step_ms']:.3f} ms = forward+backward "
              f"{r['forward_backward_ms']:.3f} + Adam {r['adam_ms']:.3f} ({args.threads} thread"
              f"{'s' if args.threads > 1 else ''})")
        print(f"  (forward+backward without the step plan {r['forward_backward_generic_ms']:.3f} "
              f"ms; the pieces below are that pass's)")
        for k, v in r["parts_ms"].items():
            share = v / r["timed_forward_backward_ms"]
            print(f"  {k:24s} {v:7.3f} ms  {share:6.1%} of the timed forward+backward")
        c = r["compiled"]
        if c is None:
            print("  (no compiled step plan here: its anatomy is left out)")
            continue
        print(f"  the step with its compiled plan, {c['step_us'] / 1e3:.3f} ms:")
        print(f"    the plan's program      {c['program_us']:7.0f} us = products only "
              f"{c['program_products_only_us']:.0f} + kernels only "
              f"{c['program_kernels_only_us']:.0f} (each alone)")
        print(f"    beside the program      {c['step_beside_program_us']:7.0f} us: the check "
              f"with Adam alone {c['adam_checked_us']:.0f}, the eps draw alone "
              f"{c['eps_draw_us']:.0f}; the rest is the Python around them and every piece "
              f"running colder in the step than alone")
        print("    each operation of the program alone (warm):")
        for label, us in c["ops_us"]:
            print(f"      {label:38s} {us:7.1f} us")
    if args.save:
        name = "profile_step.json" if args.threads == 1 else f"profile_step_t{args.threads}.json"
        path = _machine.save(name, {"rows": rows, "machine": info, "steps": args.steps,
                                    "threads": args.threads})
        print(f"# wrote {os.path.relpath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
