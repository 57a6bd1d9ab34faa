"""The ELBO gradient estimators (minivae.estimators) against the closed form of a
linear-Gaussian VAE (minivae.linear_gaussian).

Unbiasedness is a statistical claim, so it is tested as one: over R independent replicates,
each coordinate's Monte-Carlo mean must lie within 4 standard errors of the exact gradient.
With ~40 coordinates a correct estimator fails that by chance with probability ~0.3%, and the
seeds are fixed. A test with no power would prove nothing, so the same statistic is shown to
reject an estimator built on the classic wrong sampler, z = mu + exp(logvar) * eps.
"""
import numpy as np
import pytest

from minivae import estimators as est
from minivae import linear_gaussian as lg
from minivae.gradcheck import check_gradients

B, D, L = 4, 5, 3
R = 2000          # replicates per estimator
Z_MAX = 4.0       # allowed |mean - exact| in standard errors, per coordinate
CASES = [("pathwise", 1, "analytic"), ("pathwise", 1, "mc"),
         ("score", 1, "analytic"), ("score", 1, "mc"),
         ("score_baseline", 3, "analytic"), ("score_baseline", 3, "mc")]


@pytest.fixture
def setup():
    model = lg.make_model(d_in=D, latent=L, x_sigma=0.8, logvar=-1.0, seed=0)
    x = np.random.default_rng(1).normal(size=(B, D))
    return model, x


def z_scores(model, x, estimator, samples, kl, replicates=R, seed=0):
    """|MC mean - exact| / SE per coordinate (n,), and the SEs."""
    model.rng = model.backend.rng(seed)
    _, exact = lg.loss_and_grad(model, x)
    G = np.stack([est.estimate(model, x, estimator, samples=samples, kl=kl)
                  for _ in range(replicates)])
    se = G.std(axis=0, ddof=1) / np.sqrt(replicates)
    return np.abs(G.mean(axis=0) - exact) / se, se


def test_closed_form_gradient_passes_the_gradient_checker(setup):
    model, x = setup
    _, g = lg.loss_and_grad(model, x)
    lay = model.params.layout
    analytic = {n: g[lay.slice(n)].reshape(lay.shapes[n]) for n in lay.names}
    report = check_gradients(lambda: float(lg.loss(model, x)), dict(model.params.views),
                             analytic, mode="exact", name="linear-Gaussian ELBO")
    print(report)
    assert report.passed
    assert all(c.n_checked == np.prod(lay.shapes[c.name]) for c in report.checks)


def test_closed_form_loss_is_the_expected_sampled_loss(setup):
    """The closed form equals the mean of the model's own one-sample -ELBO (within 4 SE)."""
    model, x = setup
    exact = float(lg.loss(model, x))
    xs = np.tile(x, (20000, 1))                     # 20000 independent samples per example
    neg_elbo = -model.elbo(xs).reshape(20000, B).mean(axis=1)
    se = neg_elbo.std(ddof=1) / np.sqrt(neg_elbo.size)
    assert se > 0
    assert abs(neg_elbo.mean() - exact) <= Z_MAX * se


@pytest.mark.parametrize("estimator,samples,kl", CASES)
def test_estimator_is_unbiased(setup, estimator, samples, kl):
    model, x = setup
    z, se = z_scores(model, x, estimator, samples, kl)
    assert np.all(se > 0), "every coordinate must actually be random (no vacuous pass)"
    assert z.max() <= Z_MAX, f"coordinate {z.argmax()} is {z.max():.1f} SE from the exact gradient"


def _wrong_sample(xp, mu, logvar, eps):
    """The classic bug: scale exp(logvar) (a variance) instead of exp(logvar / 2)."""
    scale = xp.exp(logvar)
    return mu + scale * eps, (scale, eps)


def _wrong_sample_backward(dz, cache):
    scale, eps = cache
    return dz, dz * scale * eps, dz * scale       # d scale / d logvar = scale here


@pytest.mark.parametrize("estimator,samples,kl", [CASES[0], CASES[2], CASES[4]])
def test_the_test_rejects_the_exp_logvar_sampler(setup, monkeypatch, estimator, samples, kl):
    monkeypatch.setattr(est, "sample", _wrong_sample)
    monkeypatch.setattr(est, "sample_backward", _wrong_sample_backward)
    model, x = setup
    z, _ = z_scores(model, x, estimator, samples, kl)
    assert z.max() > 3 * Z_MAX, f"a biased sampler got through: max z = {z.max():.1f}"


def test_pathwise_with_one_sample_is_the_models_own_gradient(setup):
    model, x = setup
    eps = est.draw_eps(model, 1, B)
    g = est.pathwise(model, x, eps)
    np.testing.assert_array_equal(g, model.loss_and_grads(x, eps[0]).grads)


@pytest.mark.parametrize("estimator", ["pathwise", "score"])
@pytest.mark.parametrize("kl", ["analytic", "mc"])
def test_S_samples_average_S_single_sample_estimates(setup, estimator, kl):
    """Stacking S samples into one batch of S * B rows is the mean of S separate estimates."""
    model, x = setup
    eps = est.draw_eps(model, 5, B)
    together = est.estimate(model, x, estimator, eps=eps, kl=kl)
    apart = np.mean([est.estimate(model, x, estimator, eps=eps[s:s + 1], kl=kl)
                     for s in range(5)], axis=0)
    np.testing.assert_allclose(together, apart, rtol=1e-12, atol=1e-14)


def test_estimators_differ_only_in_the_encoder(setup):
    model, x = setup
    eps = est.draw_eps(model, 4, B)
    grads = {e: est.estimate(model, x, e, eps=eps) for e in est.ESTIMATORS}
    enc = est.encoder_slice(model)
    dec = slice(enc.stop, None)
    assert enc.stop == D * 2 * L + 2 * L
    for e in ("score", "score_baseline"):
        np.testing.assert_array_equal(grads[e][dec], grads["pathwise"][dec])
        assert not np.allclose(grads[e][enc], grads["pathwise"][enc])


def test_leave_one_out_baseline_is_computed_per_example(setup):
    """With S = 2 the LOO baseline of sample 1 is sample 2's reward: (r1 - r2) score1 + ..."""
    model, x = setup
    eps = est.draw_eps(model, 2, B)
    plain = est.score_function(model, x, eps, kl="analytic")
    loo = est.score_function(model, x, eps, kl="analytic", baseline=True)
    # adding a constant c to every reward changes the plain estimator but not the LOO one
    shift = 1000.0
    orig = model.px.nll

    def shifted(out, xx):
        f, cache = orig(out, xx)
        return f + shift, cache
    model.px.nll = shifted
    try:
        assert not np.allclose(est.score_function(model, x, eps), plain)
        np.testing.assert_allclose(est.score_function(model, x, eps, baseline=True), loo,
                                   rtol=1e-9, atol=1e-9)
    finally:
        del model.px.nll


def test_bad_arguments_are_clear_errors(setup):
    model, x = setup
    with pytest.raises(ValueError, match="S = 2"):
        est.score_function(model, x, samples=1, baseline=True)
    with pytest.raises(ValueError, match="unknown estimator"):
        est.estimate(model, x, "reinforce")
    with pytest.raises(ValueError, match="kl must be"):
        est.pathwise(model, x, kl="sampled")
    with pytest.raises(ValueError, match="expected"):
        est.pathwise(model, x, eps=np.zeros((2, B + 1, L)))


def test_estimators_run_on_the_strict_array_api_backend(setup):
    """The same numbers on array-api-strict: no NumPy-only calls hide in the estimators."""
    model, x = setup
    strict = lg.make_model(d_in=D, latent=L, seed=0, backend="strict")
    strict.params.set_flat(model.params.data)
    eps = est.draw_eps(model, 3, B)
    noise = est.draw_mvd_noise(model, 3, B)          # the measure-valued estimator's coupling
    xs, es = strict.backend.asarray(x), strict.backend.asarray(eps)
    ns = {k: strict.backend.asarray(v) for k, v in noise.items()}
    for e in est.ESTIMATORS:
        mv = e == "measure_valued"
        for kl in est.KL_MODES:
            np.testing.assert_allclose(
                strict.backend.to_host(est.estimate(strict, xs, e, es, kl=kl,
                                                    noise=ns if mv else None)),
                est.estimate(model, x, e, eps, kl=kl, noise=noise if mv else None),
                rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(strict.backend.to_host(lg.loss_and_grad(strict, xs)[1]),
                               lg.loss_and_grad(model, x)[1], rtol=1e-12)


@pytest.mark.parametrize("estimator,samples,kl", [CASES[1], CASES[3], CASES[5]])
def test_beta_weights_the_kl_term_in_every_estimator(setup, estimator, samples, kl):
    """beta-VAE (beta = 0.5): the MC-KL estimators stay unbiased for the beta-weighted loss."""
    model, x = setup
    model.beta = 0.5
    z, _ = z_scores(model, x, estimator, samples, kl)
    assert z.max() <= Z_MAX
    eps = est.draw_eps(model, 1, B)
    np.testing.assert_allclose(est.pathwise(model, x, eps), model.loss_and_grads(x, eps[0]).grads,
                               rtol=1e-12, atol=1e-14)
