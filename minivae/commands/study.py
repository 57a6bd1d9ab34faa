"""Measure what backpropagation through a random sample buys.

`minivae study estimators` builds the default VAE (784-400-20), and for a fixed batch of test
images measures the variance of each gradient estimator of the encoder's parameters:
pathwise (reparametrization), score function (REINFORCE), score function with a leave-one-out
baseline (each with the analytic KL and with the Monte-Carlo KL), score function with the
delta-method control variate, and the measure-valued estimator, with each one's cost in decoder
evaluations. It does so at initialisation and again after a short Adam run.

Then discrete latents: a small DiscreteVAE (3 categorical variables of 4 classes, so the exact
gradient is a sum over 64 configurations) on the same images, where REINFORCE (with and
without a baseline), Gumbel-softmax and straight-through at several temperatures are measured
for bias against the exact gradient and for variance, at initialisation and after training.

It prints the tables (with --json: the numbers as one JSON object instead) and writes two
figures (variance against the number of samples S; bias and variance against tau) unless
--no-figure.

The estimators are in minivae/estimators.py and minivae/discrete.py (maths in the docstrings);
their unbiasedness is proven against a closed-form linear-Gaussian VAE
(tests/test_estimators.py, tests/test_estimators_gaussian.py) and exact enumeration
(tests/test_discrete.py).
"""
from __future__ import annotations

from ..backend import strict_json
from . import number, writable_dir

import json
import os
import time

HELP = ("measure the gradient estimators: pathwise, score function (+ baselines), measure-valued; "
        "REINFORCE vs Gumbel-softmax for discrete latents")


DEFAULTS = {"batch": 32, "replicates": 50, "steps": 300}
QUICK = {"batch": 8, "replicates": 5, "steps": 20}


def add_arguments(p) -> None:
    p.add_argument("what", choices=["estimators"], help="what to study")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--out", default=os.path.join("runs", "study"),
                   help="directory for the figure (default: runs/study)")
    p.add_argument("--no-figure", action="store_true", help="skip the figures")
    p.add_argument("--batch", type=number(1, kind=int, high=1000),
                   help="test images in the fixed batch (32, --quick 8; at most mnist10k's 1000)")
    p.add_argument("--samples", type=number(2, kind=int, high=1000), default=4,
                   help="samples S per image for the table (4; the baseline needs >= 2; at "
                        "most 1000)")
    p.add_argument("--replicates", type=number(2, kind=int),
                   help="independent estimates per measured variance (50, --quick 5; >= 2)")
    p.add_argument("--steps", type=number(0, kind=int),
                   help="Adam steps of the short training (300, --quick 20)")
    p.add_argument("--seed", type=number(0, kind=int), default=0)
    p.add_argument("--backend", default="numpy", help="numpy | cupy | strict | auto (numpy)")
    p.add_argument("--quick", action="store_true",
                   help="tiny settings, for a smoke test (numbers are rough): --batch 8, "
                        "--replicates 5, --steps 20 and a shorter sweep, unless given")


def run(args) -> int:
    from ..cli import UserError
    from ..engine.mpi import MPIUnavailable, run_on_all_ranks, world

    try:
        comm = world()     # under mpiexec -n N the replicates are split over the N ranks
    except MPIUnavailable as e:
        raise UserError(str(e)) from None
    return run_on_all_ranks(comm, "minivae study", lambda: _run(args, comm))


def _run(args, comm) -> int:
    from .. import VAE, DiscreteVAE
    from .. import study
    from ..estimators import decoder_evaluations
    from ..cli import UserError
    from ..data import load_dataset

    root = comm.rank == 0                         # rank 0 alone prints and writes
    if not args.no_figure:                        # before the work: refuse an --out rank 0
        from ..engine.data_parallel import share_bytes   # could not write the figures into

        def check_out() -> bytes:                 # rank 0 checks; every rank gets its verdict
            writable_dir(args.out)
            return b""

        share_bytes(comm, check_out, errors=(UserError,))
    t0 = time.perf_counter()
    sweep = (1, 2, 4, 8, 16)
    # the defaults, or --quick's; a value given on the command line wins over both (the
    # header and the JSON report the values used)
    for name, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.quick:
        sweep = (1, 2, 4)
    ds = load_dataset("mnist10k")
    model = VAE(backend=args.backend, seed=args.seed)
    x = model.backend.asarray(ds.x_test[: args.batch], dtype=model.dtype)
    log = (lambda *a: None) if args.json or not root else (lambda *a: print(*a, flush=True))

    log(f"default VAE {model.d_in}-400-{model.latent}, {model.n_params():,} parameters; "
        f"batch of {args.batch} test images, S = {args.samples}, {args.replicates} replicates"
        + (f", split over {comm.size} MPI ranks" if comm.size > 1 else ""))
    stages = {}
    log("measuring at initialisation ...")
    stages["init"] = study.measure(model, x, args.samples, sweep, args.replicates, comm)
    log(f"training {args.steps} Adam steps (batch 100, lr 1e-3) ...")
    losses = study.train(model, ds.x_train, steps=args.steps, seed=args.seed)
    log("measuring after training ...")
    stages["trained"] = study.measure(model, x, args.samples, sweep, args.replicates, comm)
    costs = {e: decoder_evaluations(e, model.latent, args.samples)
             for _, e, _ in study.CONFIGS}

    # discrete latents, small enough for the exact gradient by enumeration
    dmodel = DiscreteVAE(hidden=(200,), latent=3, categories=4, tau=1.0, backend=args.backend,
                         dtype="float64", seed=args.seed)
    dx = dmodel.backend.asarray(ds.x_test[: min(args.batch, 16)], dtype=dmodel.dtype)
    reps = 2 * args.replicates
    log(f"discrete: DiscreteVAE 784-200-(3 x 4 categories), exact gradient over 64 "
        f"configurations; batch of {dx.shape[0]}, S = {args.samples}, {reps} replicates")
    discrete = {"init": study.discrete_measure(dmodel, dx, args.samples, reps)}
    log(f"training it {args.steps} Adam steps (relaxed, tau 1) ...")
    dlosses = study.train(dmodel, ds.x_train, steps=args.steps, seed=args.seed)
    discrete["trained"] = study.discrete_measure(dmodel, dx, args.samples, reps)

    figure = tau_figure = None
    if not root:
        return 0
    if not args.no_figure:
        os.makedirs(args.out, exist_ok=True)
        figure = os.path.join(args.out, "estimator_variance.png")
        study.plot_sweeps({"at initialisation": stages["init"],
                           f"after {args.steps} Adam steps": stages["trained"]}, figure)
        tau_figure = os.path.join(args.out, "discrete_bias_variance.png")
        study.plot_tau({"init": discrete["init"], "trained": discrete["trained"]}, tau_figure)
    result = _result(stages, args, losses, figure, time.perf_counter() - t0)
    result["cost_decoder_evaluations"] = {
        label: costs[e] for label, e, _ in study.CONFIGS}
    result["discrete"] = {
        "model": "DiscreteVAE 784-200-(3 x 4), float64, Bernoulli", "batch": int(dx.shape[0]),
        "samples": args.samples, "replicates": reps, "taus": list(study.DISCRETE_TAUS),
        "exact_loss": {s: discrete[s]["exact_loss"] for s in discrete},
        "train_loss_before": dlosses[0] if dlosses else None,
        "train_loss_after": dlosses[-1] if dlosses else None,
        "rows": {s: discrete[s]["rows"] for s in discrete},
        "figure": tau_figure,
        "measures": "bias: ||mean_R g - exact|| / ||exact||; noise: the same for an unbiased "
                    "estimator with R replicates; variance: mean over encoder coordinates; "
                    "max_z: largest |mean - exact| / SE over encoder coordinates"}
    result["setup"]["seconds"] = time.perf_counter() - t0
    if args.json:
        print(strict_json(result, indent=2))
    else:
        print(_table(stages, args, costs))
        r = result["ratio_score_over_pathwise"]
        print(f"\nscore / pathwise variance: {r['init']:.0f}x at initialisation, "
              f"{r['trained']:.0f}x after training")
        print(_discrete_table(discrete, args, reps))
        if figure:
            print(f"figures: {figure}, {tau_figure}")
        print(f"({result['setup']['seconds']:.1f} s)")
    return 0


def _result(stages, args, losses, figure, seconds) -> dict:
    init, trained = stages["init"]["table"], stages["trained"]["table"]

    def entry(label):
        return {"mean_variance": init[label], "init": init[label], "trained": trained[label]}

    def by_kl(suffix):
        return {"mean_variance": init["pathwise" + suffix], "estimator": "pathwise",
                "by_estimator": {
                    name: entry(label + suffix) for name, label in
                    (("pathwise", "pathwise"), ("score", "score"),
                     ("score_baseline", "score + LOO baseline"))}}

    return {
        "pathwise": entry("pathwise"),
        "score": entry("score"),
        "score_baseline": entry("score + LOO baseline"),
        "score_delta": entry("score + delta-method CV"),
        "measure_valued": entry("measure-valued"),
        "analytic_kl": by_kl(""),
        "mc_kl": by_kl(", MC KL"),
        "ratio_score_over_pathwise": {s: stages[s]["table"]["score"] / stages[s]["table"]["pathwise"]
                                      for s in ("init", "trained")},
        "sweep": {s: stages[s]["sweep"] for s in stages},
        "setup": {"model": "VAE 784-400-20", "batch": args.batch, "samples": args.samples,
                  "replicates": args.replicates, "train_steps": args.steps,
                  "loss_before": losses[0] if losses else None,
                  "loss_after": losses[-1] if losses else None,
                  "variance_of": "encoder parameters' gradient of mean_B(-ELBO)",
                  "kl_default": "analytic (top-level estimator entries)",
                  "figure": figure, "seconds": seconds},
    }


def _table(stages, args, costs) -> str:
    from ..study import CONFIGS

    init, trained = stages["init"]["table"], stages["trained"]["table"]
    ref = init["pathwise"]
    cost = {label: costs[e] for label, e, _ in CONFIGS}
    lines = [f"\nGaussian latents: encoder gradient variance, mean over coordinates "
             f"(S = {args.samples})",
             f"{'estimator':<30}{'init':>12}{'trained':>12}{'init / pathwise':>17}"
             f"{'decoder evals':>15}"]
    for label in init:
        lines.append(f"{label:<30}{init[label]:>12.3e}{trained[label]:>12.3e}"
                     f"{init[label] / ref:>16.1f}x{cost[label]:>14.4g}x")
    lines.append("(decoder evals: decoder forward rows per example per sample, pathwise = 1)")
    return "\n".join(lines)


def _discrete_table(discrete, args, reps) -> str:
    init, trained = discrete["init"]["rows"], discrete["trained"]["rows"]
    lines = [f"\ncategorical latents: bias against the exact gradient and variance "
             f"(S = {args.samples}, {reps} replicates)",
             f"{'':<32}{'--- at initialisation ---':>27}{'--- after training ---':>27}",
             f"{'estimator':<32}{'bias':>8}{'/ noise':>8}{'variance':>11}"
             f"{'bias':>8}{'/ noise':>8}{'variance':>11}"]
    for label in init:
        a, b = init[label], trained[label]
        lines.append(f"{label:<32}" + "".join(
            f"{r['bias']:>8.3f}{r['bias'] / r['noise']:>8.1f}{r['variance']:>11.3e}"
            for r in (a, b)))
    lines.append("(bias: ||E[g] - exact|| / ||exact|| over the encoder's coordinates; noise: the "
                 "same number for an unbiased\n estimator with this many replicates, so bias / "
                 "noise near 1 or below is no measurable bias)")
    return "\n".join(lines)
