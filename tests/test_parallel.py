"""The data-parallel wrapper (minivae.DataParallel), its thread team (minivae.engine.threads)
and the BLAS helpers (minivae.engine.blas).

The specification: the wrapper's step is the reference step (model.loss_and_grads, then
opt.step()) with nothing changed but the order of the floating-point additions. Same random
stream, same losses, same gradients to float64 round-off, same trained weights; errors in a
worker reach the caller; nothing deadlocks.
"""
import signal
import threading
import time

import numpy as np
import pytest

import minivae
from minivae import VAE, Adam, Adagrad, Autoencoder, DataParallel, SGD
from minivae.engine import blas, optimizer_step
from minivae.engine import threads as parallel
from minivae.params import Layout, Params

needs_pinnable_blas = pytest.mark.skipif(
    not blas.pinnable(),
    reason="NumPy's BLAS has no openblas_set_num_threads_local, so minivae runs one thread")


@pytest.fixture(autouse=True)
def default_threads():
    """Every test starts and ends with the default thread count."""
    parallel.set_num_threads(None)
    yield
    parallel.set_num_threads(None)


def _small_rows(monkeypatch):
    monkeypatch.setattr(parallel, "MIN_ROWS", 2)   # so that a small batch is split too


# -- the step ---------------------------------------------------------------------------------
MODELS = {
    "vae": lambda: VAE(d_in=30, hidden=(16, 12), latent=3, dtype="float64", seed=3),
    "vae_beta_tanh": lambda: VAE(d_in=30, hidden=(16,), latent=3, activation="tanh", beta=0.3,
                                 dtype="float64", seed=3),
    "vae_gaussian_learned": lambda: VAE(d_in=30, hidden=(16,), latent=3,
                                        likelihood="gaussian_learned", dtype="float64", seed=3),
    "autoencoder": lambda: Autoencoder(d_in=30, hidden=(16,), latent=3, dtype="float64", seed=3),
}


@needs_pinnable_blas
@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("threads", [2, 3, 4])
def test_split_batch_gives_the_one_thread_loss_and_gradients(monkeypatch, rng, kind, threads):
    _small_rows(monkeypatch)
    x = rng.random((11, 30))                               # 11 rows: blocks of unequal size
    if "gaussian" not in kind:
        x = (x < 0.4).astype(np.float64)
    runs = {}
    for n in (1, threads):
        parallel.set_num_threads(n)
        m = MODELS[kind]()                                  # same seed: same weights, same eps
        assert DataParallel(m)._k(11) == n
        r = DataParallel(m).loss_and_grads(x)
        runs[n] = (r, m)
    (r1, m1), (rk, mk) = runs[1], runs[threads]
    ref_m = MODELS[kind]()
    ref = ref_m.loss_and_grads(x)                           # the reference, one thread, plain
    np.testing.assert_allclose(rk.grads, ref.grads, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(rk.loss, ref.loss, rtol=1e-13, atol=1e-15)
    assert rk.grads is mk.params.grad                       # the model's own buffer, summed
    np.testing.assert_allclose(rk.grads, r1.grads, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(rk.elbo, r1.elbo, rtol=1e-13)   # per example, in batch order
    for name in ("loss", "recon", "kl"):
        np.testing.assert_allclose(getattr(rk, name), getattr(r1, name), rtol=1e-13, atol=1e-15)
    # and the next draw of eps is the same: the split consumed the stream exactly as one pass
    if kind != "autoencoder":
        np.testing.assert_array_equal(mk.draw_eps(2), m1.draw_eps(2))


@needs_pinnable_blas
def test_given_eps_is_split_by_rows(monkeypatch, rng):
    _small_rows(monkeypatch)
    x = (rng.random((8, 30)) < 0.4).astype(np.float64)
    m = MODELS["vae"]()
    eps = rng.standard_normal((8, 3))
    g1 = m.loss_and_grads(x, eps).grads.copy()             # the reference
    np.testing.assert_allclose(DataParallel(m, threads=2).loss_and_grads(x, eps).grads, g1,
                               rtol=1e-12, atol=1e-15)


@needs_pinnable_blas
def test_thirty_adam_steps_on_two_threads_track_one_thread(monkeypatch, rng, kernel_mode):
    _small_rows(monkeypatch)
    xs = [(rng.random((16, 30)) < 0.4).astype(np.float64) for _ in range(30)]
    final = {}
    for n in (1, 2):
        parallel.set_num_threads(n)
        m = MODELS["vae"]()
        opt, dp = Adam(m.params, lr=1e-2), DataParallel(m)
        losses = []
        for x in xs:
            losses.append(float(dp.loss_and_grads(x).loss))
            dp.optimizer_step(opt)
        final[n] = (np.array(losses), m.params.data.copy())
    np.testing.assert_allclose(final[2][0], final[1][0], rtol=1e-10)
    np.testing.assert_allclose(final[2][1], final[1][1], rtol=1e-9, atol=1e-12)


OPTIMIZERS = {
    "adam": lambda P: Adam(P, lr=1e-2),
    "sgd": lambda P: SGD(P, lr=0.05),
    "adamw": lambda P: Adam(P, lr=1e-2, weight_decay=0.1, decoupled=True),
    "adam_l2": lambda P: Adam(P, lr=1e-2, weight_decay=0.1),         # no sliced form: plain
    "sgd_momentum": lambda P: SGD(P, lr=0.05, momentum=0.9),         # step 1 plain, then sliced
    "adagrad": lambda P: Adagrad(P, lr=0.05),
}


@needs_pinnable_blas
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_train_step_is_loss_and_grads_then_step(monkeypatch, rng, opt_name, threads,
                                                 kernel_mode):
    _small_rows(monkeypatch)
    parallel.set_num_threads(threads)
    xs = [(rng.random((12, 30)) < 0.4).astype(np.float64) for _ in range(6)]
    fused_m, plain_m = MODELS["vae"](), MODELS["vae"]()
    fused_o, plain_o = OPTIMIZERS[opt_name](fused_m.params), OPTIMIZERS[opt_name](plain_m.params)
    for x in xs:
        r_fused = minivae.train_step(fused_m, fused_o, x)
        r_plain = plain_m.loss_and_grads(x)                 # the reference
        plain_o.step()
        np.testing.assert_allclose(r_fused.loss, r_plain.loss, rtol=1e-13)
        np.testing.assert_allclose(r_fused.grads, r_plain.grads, rtol=1e-12, atol=1e-15)
    assert fused_o.t == plain_o.t == len(xs)
    np.testing.assert_allclose(fused_m.params.data, plain_m.params.data, rtol=1e-11, atol=1e-13)


@needs_pinnable_blas
@pytest.mark.parametrize("opt_name", ["adam", "adamw", "adam_l2", "sgd_momentum"])
@pytest.mark.parametrize("threads", [1, 2])
def test_the_checked_update_is_the_check_then_the_update_to_the_bit(monkeypatch, rng, opt_name,
                                                                    threads):
    """A batch too small to split (one pass, products on the BLAS's threads): where the
    optimizer has one (Adam, AdamW with the kernels), train_step checks the gradient and
    updates in one compiled call (engine/optim.py: checked_step). The parameters, the
    optimizer's state and its count are those of the same pass followed by the check and
    the update apart (loss_and_grads, then optimizer_step), to the bit."""
    parallel.set_num_threads(threads)
    from minivae.engine import data_parallel, kernels
    checked, real = [], data_parallel.checked_step
    monkeypatch.setattr(data_parallel, "checked_step",
                        lambda opt, parts: checked.append(real(opt, parts)) or checked[-1])
    xs = [(rng.random((64, 784)) < 0.3).astype(np.float32) for _ in range(4)]
    a_m, b_m = VAE(seed=2), VAE(seed=2)
    a_o, b_o = OPTIMIZERS[opt_name](a_m.params), OPTIMIZERS[opt_name](b_m.params)
    a_dp, b_dp = DataParallel(a_m), DataParallel(b_m)
    for x in xs:
        eps = rng.standard_normal((64, a_m.latent)).astype(np.float32)
        a_dp.train_step(a_o, x, eps)
        b_dp.loss_and_grads(x, eps)
        b_dp.optimizer_step(b_o)
    assert a_o.t == b_o.t == len(xs)
    fused = kernels.enabled() and opt_name in ("adam", "adamw")
    assert checked == [True] * len(xs) if fused else not any(checked)
    for name in ("data", "grad"):
        np.testing.assert_array_equal(getattr(a_m.params, name), getattr(b_m.params, name))
    for name in a_o.state_names:
        np.testing.assert_array_equal(getattr(a_o, name), getattr(b_o, name))


def test_the_checked_update_refused_by_its_arguments_does_not_count_the_step():
    """checked_step behind the buffer check (an optimizer buffer made read-only after it): the
    compiled call refuses it before writing anything, and the step is not counted."""
    from minivae.engine import kernels
    from minivae.engine.optim import checked_step
    if not kernels.enabled():
        pytest.skip("the checked update needs the compiled kernels")
    m = VAE(40, (16,), 3, seed=0)
    opt = Adam(m.params)
    m.params.grad[:] = 0.5
    assert checked_step(opt, 2) is True and opt.t == 1
    before = _state(m, opt)
    opt.m.flags.writeable = False
    with pytest.raises((ValueError, BufferError)):
        checked_step(opt, 2)
    _same_state(before, _state(m, opt))


@needs_pinnable_blas
def test_train_step_reports_a_worker_error_and_takes_no_step(monkeypatch, rng):
    _small_rows(monkeypatch)
    parallel.set_num_threads(2)
    m = MODELS["vae"]()
    opt, dp = Adam(m.params), DataParallel(m)
    before = m.params.data.copy()
    real_pass = dp._forward_backward

    def pass_failing_on_the_second_block(model, P, x, eps, n):
        if P is not m.params:
            raise FloatingPointError("in the second row block")
        return real_pass(model, P, x, eps, n)

    monkeypatch.setattr(dp, "_forward_backward", pass_failing_on_the_second_block)
    x = (rng.random((8, 30)) < 0.4).astype(np.float64)
    with pytest.raises(FloatingPointError, match="second row block"):   # not BrokenBarrierError
        dp.train_step(opt, x)
    assert opt.t == 0
    np.testing.assert_array_equal(m.params.data, before)


@needs_pinnable_blas
def test_train_step_inside_a_busy_team_runs_on_one_thread(monkeypatch, rng):
    _small_rows(monkeypatch)
    parallel.set_num_threads(2)
    x = (rng.random((8, 30)) < 0.4).astype(np.float64)
    nested_m, plain_m = MODELS["vae"](), MODELS["vae"]()
    nested_o, plain_o = Adam(nested_m.params), Adam(plain_m.params)
    parallel.team(2).run([lambda: minivae.train_step(nested_m, nested_o, x), lambda: None])
    plain_m.loss_and_grads(x)
    plain_o.step()
    np.testing.assert_allclose(nested_m.params.data, plain_m.params.data, rtol=1e-13)


def test_train_step_needs_the_models_own_optimizer():
    a, b = MODELS["vae"](), MODELS["vae"]()
    with pytest.raises(ValueError, match="another model"):
        minivae.train_step(a, Adam(b.params), np.zeros((4, 30)))


def test_small_batches_and_other_backends_are_not_split(monkeypatch):
    parallel.set_num_threads(4)
    dp = DataParallel(MODELS["vae"]())
    assert dp._k(2 * parallel.MIN_ROWS - 1) == 1
    assert dp._k(4 * parallel.MIN_ROWS) == (4 if blas.pinnable() else 1)
    strict = VAE(d_in=30, hidden=(16,), latent=3, backend="strict", dtype="float64", seed=3)
    sdp = DataParallel(strict)
    assert sdp._k(4 * parallel.MIN_ROWS) == 1                       # no engine for strict
    x = strict.xp.asarray(np.zeros((4 * parallel.MIN_ROWS, 30)))
    opt = Adam(strict.params)
    assert sdp.train_step(opt, x).grads is strict.params.grad        # runs; the reference
    assert opt.t == 1


@needs_pinnable_blas
@pytest.mark.parametrize("opt_name", ["adam", "sgd_momentum"])
def test_a_batch_too_small_to_split_runs_here_with_the_blas_on_the_threads(rng, opt_name):
    """Below MIN_ROWS rows per thread the pass runs on the calling thread, with the BLAS on
    minivae's thread count, capped at the usable cores (not a row split, not one BLAS thread),
    and the step is still the reference step; the BLAS count is restored afterwards."""
    parallel.set_num_threads(3)
    seen = []
    fast, ref = MODELS["vae"](), MODELS["vae"]()
    dp = DataParallel(fast)
    pass_ = dp._forward_backward

    def spy(*a):
        seen.append((threading.current_thread() is threading.main_thread(),
                     blas.describe().get("threads")))
        return pass_(*a)

    dp._forward_backward = spy
    B = 2 * parallel.MIN_ROWS - 1
    assert dp._k(B) == 1
    x = (rng.random((B, 30)) < 0.4).astype(np.float64)
    eps = rng.standard_normal((B, 3))
    opt_f, opt_r = OPTIMIZERS[opt_name](fast.params), OPTIMIZERS[opt_name](ref.params)
    before = blas.set_threads(1)
    try:
        for _ in range(3):
            r = dp.train_step(opt_f, x, eps)
            want = ref.loss_and_grads(x, eps)
            opt_r.step()
            np.testing.assert_allclose(float(r.loss), float(want.loss), rtol=1e-13)
        assert blas.set_threads(before) == 1                  # restored after the step
    finally:
        blas.set_threads(before)
    assert seen == [(True, min(3, parallel.usable_cores()))] * 3
    np.testing.assert_allclose(fast.params.data, ref.params.data, rtol=1e-12, atol=1e-14)


def test_thread_count_is_validated(monkeypatch):
    for bad in (0, 1.5, -1, "2", True, 1025, 100_000):
        with pytest.raises(ValueError, match="whole number from 1 to 1024"):
            minivae.set_num_threads(bad)
    monkeypatch.setenv("MINIVAE_NUM_THREADS", "two")
    if blas.pinnable():
        with pytest.raises(ValueError, match="MINIVAE_NUM_THREADS must be a whole number"):
            minivae.get_num_threads()
    if blas.pinnable():
        for bad in ("0", "-2", "1025"):
            monkeypatch.setenv("MINIVAE_NUM_THREADS", bad)
            with pytest.raises(ValueError, match="MINIVAE_NUM_THREADS must be from 1 to 1024"):
                minivae.get_num_threads()
    minivae.set_num_threads(1024)                  # the bound itself is allowed
    minivae.set_num_threads(None)
    monkeypatch.setenv("MINIVAE_NUM_THREADS", "3")
    assert minivae.get_num_threads() == (3 if blas.pinnable() else 1)
    minivae.set_num_threads(2)                     # the call wins over the environment
    assert minivae.get_num_threads() == (2 if blas.pinnable() else 1)


def test_the_default_shares_the_cores_among_an_mpi_launch_s_local_ranks(monkeypatch):
    """The launcher's environment says how many ranks share this machine; the default count
    is the cores divided among them, at least 1 (tests/test_mpi.py checks it under mpiexec)."""
    for var in ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE",
                "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "PMI_RANK",
                "OMPI_COMM_WORLD_RANK"):
        monkeypatch.delenv(var, raising=False)
    cores = parallel.usable_cores()
    assert parallel.default_threads() == max(1, min(cores, parallel.MAX_DEFAULT_THREADS))
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "2")
    assert parallel.default_threads() == max(1, min(cores // 2, parallel.MAX_DEFAULT_THREADS))
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", str(cores * 8))
    assert parallel.default_threads() == 1
    monkeypatch.delenv("OMPI_COMM_WORLD_LOCAL_SIZE")
    monkeypatch.setenv("PMI_SIZE", "3")                # no local count: all on this machine
    assert parallel.default_threads() == max(1, min(cores // 3, parallel.MAX_DEFAULT_THREADS))


# -- the team -----------------------------------------------------------------------------------
def test_team_returns_results_in_order_and_runs_jobs_on_other_threads():
    team = parallel.team(3)
    names = team.run([lambda i=i: (i, threading.current_thread().name) for i in range(3)])
    assert [i for i, _ in names] == [0, 1, 2]
    assert names[0][1] == threading.current_thread().name      # the first job in the caller
    assert len({n for _, n in names}) == 3


def test_a_failing_job_raises_in_the_caller_and_the_team_still_works():
    team = parallel.team(2)

    def boom():
        raise FloatingPointError("from a worker")

    with pytest.raises(FloatingPointError, match="from a worker"):
        team.run([lambda: 1, boom])
    assert team.run([lambda: 1, lambda: 2]) == [1, 2]


def test_a_job_that_uses_the_team_itself_does_not_deadlock():
    team = parallel.team(2)
    inner = lambda: sum(team.run([lambda: 1, lambda: 2]))        # noqa: E731
    assert team.run([inner, lambda: 0]) == [3, 0]


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs signal.setitimer")
def test_an_interrupt_while_waiting_leaves_no_stale_answer_for_the_next_run():
    """Ctrl-C arrives while the caller waits for a worker: the worker's late answer must not
    be taken for the next run's."""
    team = parallel.team(2)

    def on_alarm(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)           # fires while the caller waits
        with pytest.raises(KeyboardInterrupt):
            team.run([lambda: "old", lambda: time.sleep(0.3) or "old"])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert team.run([lambda: "new", lambda: "new"]) == ["new", "new"]


FORK_CHILD = """
import multiprocessing as mp
from minivae.engine import threads as parallel

def team_sum():
    return sum(parallel.team(2).run([lambda: 1, lambda: 2]))

parallel.team(2).run([lambda: 0, lambda: 0])     # the parent's team has running threads
with mp.get_context("fork").Pool(1) as pool:
    print(pool.apply_async(team_sum).get(timeout=20))
"""


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_a_forked_child_gets_a_working_team():
    """In a fresh interpreter (the test session may hold other libraries' threads)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", FORK_CHILD], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "3"


def test_in_ranges_covers_every_element_once(monkeypatch):
    parallel.set_num_threads(3)
    monkeypatch.setattr(parallel, "MIN_SLICE", 4)
    a = np.zeros(50)

    def bump(lo, hi):
        a[lo:hi] += 1.0

    parallel.in_ranges(50, bump)
    np.testing.assert_array_equal(a, 1.0)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("make", [
    lambda P: Adam(P, lr=0.01),
    lambda P: Adam(P, lr=0.01, weight_decay=0.1, decoupled=True),
    lambda P: Adagrad(P, lr=0.05),
    lambda P: SGD(P, lr=0.05, momentum=0.9),
], ids=["adam", "adamw", "adagrad", "sgd_momentum"])
def test_optimizer_split_over_threads_equals_the_plain_update(monkeypatch, threads, make, rng,
                                                              kernel_mode):
    parallel.set_num_threads(threads)
    monkeypatch.setattr(parallel, "MIN_SLICE", 8)         # so that a small buffer is split
    layout = Layout([("a", (37,)), ("b", (5, 4))])
    P_fast, P_plain = Params(layout, "numpy", "float64"), Params(layout, "numpy", "float64")
    P_fast.data[...] = P_plain.data[...] = rng.standard_normal(layout.size)
    fast, plain = make(P_fast), make(P_plain)
    for _ in range(5):
        P_fast.grad[...] = P_plain.grad[...] = rng.standard_normal(layout.size)
        optimizer_step(fast)                             # the engine's update, in slices
        plain.step()                                     # the reference
    np.testing.assert_allclose(P_fast.data, P_plain.data, rtol=1e-13)


# -- BLAS helpers -------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_axpby_is_a_x_plus_b_y(rng, dtype):
    x, y = rng.standard_normal(1001).astype(dtype), rng.standard_normal(1001).astype(dtype)
    want = 0.3 * x.astype(np.float64) + 0.9 * y.astype(np.float64)
    blas.axpby(0.3, x, 0.9, y)
    tol = 1e-6 if dtype == np.float32 else 1e-14       # one or two roundings per element
    np.testing.assert_allclose(y, want, rtol=tol, atol=tol * np.abs(want).max())


def test_axpby_falls_back_to_numpy_for_strided_arrays(rng):
    x, y = rng.standard_normal(20)[::2], rng.standard_normal(20)[::2]   # not contiguous
    want = -2.0 * x + y
    blas.axpby(-2.0, x, 1.0, y, tmp=np.empty(10))
    np.testing.assert_allclose(y, want, rtol=1e-14)


@needs_pinnable_blas
def test_one_blas_thread_lasts_only_for_the_block_and_the_step():
    before = blas.set_threads(2)
    try:
        with parallel.one_blas_thread():
            assert blas.set_threads(1) == 1
        assert blas.set_threads(2) == 2
        parallel.team(2).run([lambda: blas.set_threads(1), lambda: None])  # inside: 1
        assert blas.set_threads(2) == 2                     # after a team run: restored
    finally:
        blas.set_threads(before)


@needs_pinnable_blas
def test_a_small_batch_step_inside_a_one_thread_block_still_threads_its_products(rng):
    """The CLI runs every command inside one_blas_thread(); the step of a batch too small to
    split must still give its products minivae's thread count (and set 1 again after), or
    `minivae train` at batch 128 would run on one core."""
    parallel.set_num_threads(2)
    m = MODELS["vae"]()
    dp = DataParallel(m)
    seen = []
    pass_ = dp._forward_backward
    dp._forward_backward = lambda *a: seen.append(blas.describe().get("threads")) or pass_(*a)
    before = blas.set_threads(2)
    try:
        with parallel.one_blas_thread():
            assert blas.describe()["threads"] == 1
            dp.train_step(Adam(m.params), (rng.random((20, 30)) < 0.4).astype(np.float64))
            assert blas.describe()["threads"] == 1            # the enclosing count again
            with parallel.blas_threads(3):
                with parallel.one_blas_thread():
                    assert blas.describe()["threads"] == 1
                assert blas.describe()["threads"] == 3
            assert blas.describe()["threads"] == 1
        assert blas.describe()["threads"] == 2                # the count from before
    finally:
        blas.set_threads(before)
    assert seen == [2]


@needs_pinnable_blas
def test_overlapping_blocks_in_two_threads_restore_the_original_count():
    before = blas.set_threads(2)
    try:
        inside, leave = threading.Event(), threading.Event()

        def other():
            with parallel.one_blas_thread():
                inside.set()
                leave.wait(5)

        t = threading.Thread(target=other)
        with parallel.one_blas_thread():
            t.start()
            inside.wait(5)
        leave.set()                                          # the other block ends last
        t.join(5)
        assert blas.set_threads(2) == 2
    finally:
        blas.set_threads(before)


# -- the communicator seam: more than one "process" ---------------------------------------------
class LocalGroup:
    """``size`` ranks in one process (each a thread), summing over shared memory in rank
    order: a real implementation of the Communicator interface, the way an MPI one will be
    used, small enough to run in a test."""

    def __init__(self, size):
        self.size, self.slots = size, [None] * size
        self.barrier = threading.Barrier(size)

    def rank(self, r):
        group = self

        class Member(minivae.engine.Communicator):
            rank, size = r, group.size

            def rows(self, n):
                return parallel.bounds(n, group.size)[r]

            def allreduce_sum(self, buf):
                group.slots[r] = np.array(buf, copy=True)
                group.barrier.wait()
                total = sum(group.slots[1:], group.slots[0].copy())
                group.barrier.wait()
                buf[...] = total

            def broadcast(self, buf, root=0):
                if r == root:
                    group.slots[root] = np.array(buf, copy=True)
                group.barrier.wait()
                buf[...] = group.slots[root]
                group.barrier.wait()

        return Member()


def test_two_ranks_through_the_communicator_train_like_one_process(rng):
    xs = [(rng.random((12, 30)) < 0.4).astype(np.float64) for _ in range(5)]
    ref = MODELS["vae"]()
    ref_opt = Adam(ref.params, lr=1e-2)
    ref_losses = []
    for x in xs:
        ref_losses.append(float(ref.loss_and_grads(x).loss))
        ref_opt.step()

    group, out = LocalGroup(2), {}

    def rank(r):
        m = MODELS["vae"]()                       # same seed: the same eps for the global batch
        if r == 1:
            m.params.data[...] = 0.0              # the broadcast must give it rank 0's weights
        dp = DataParallel(m, threads=1, comm=group.rank(r))
        opt = Adam(m.params, lr=1e-2)
        out[r] = ([float(dp.train_step(opt, x).loss) for x in xs], m.params.data.copy())

    ts = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    (l0, p0), (l1, p1) = out[0], out[1]
    np.testing.assert_array_equal(p0, p1)         # every rank applied the same update
    assert l0 == l1                               # the loss of the global batch, on every rank
    np.testing.assert_allclose(l0, ref_losses, rtol=1e-12)
    np.testing.assert_allclose(p0, ref.params.data, rtol=1e-10, atol=1e-13)


def test_replica_checksums_and_shared_bytes_over_the_seam():
    """check_same names the rank whose bytes differ, on every rank; share_bytes gives every
    rank root's bytes, and root's refusal (of a listed type) is raised on every rank."""
    from minivae.engine.data_parallel import ReplicasDiffer, check_same, share_bytes

    group, out = LocalGroup(3), {}

    def rank(r):
        comm = group.rank(r)
        res = {}
        p = np.arange(5.0)
        check_same(comm, {"parameters": p}, "at the start")          # equal: nothing happens
        if r == 2:
            p[3] = np.nextafter(p[3], 9.0)
        try:
            check_same(comm, {"parameters": p, "other": np.ones(2)}, "after epoch 1")
        except ReplicasDiffer as e:
            res["differ"] = str(e)
        res["bytes"] = share_bytes(comm, lambda: b"checkpoint bytes")
        try:
            share_bytes(comm, lambda: (_ for _ in ()).throw(ValueError("damaged header")),
                        errors=(ValueError,))
        except ValueError as e:
            res["refused"] = (str(e), getattr(e, "all_ranks", False))
        out[r] = res

    ts = [threading.Thread(target=rank, args=(r,)) for r in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    for r in range(3):
        assert "after epoch 1" in out[r]["differ"] and "parameters on rank 2 " in out[r]["differ"]
        assert "other" not in out[r]["differ"]
        assert out[r]["bytes"] == b"checkpoint bytes"
        assert out[r]["refused"] == ("damaged header", True)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("B", [1, 7, 128, 600])
def test_the_reported_means_are_np_mean_of_the_rows_to_the_bit(rng, dtype, B):
    """The step's loss, recon and KL (add.reduce / B, without np.mean's wrapper) are np.mean of
    the per-row values, as the reference reports them."""
    m = VAE(d_in=30, hidden=(16,), latent=3, dtype=dtype, seed=2)
    x = (rng.random((B, 30)) < 0.4).astype(dtype)
    eps = rng.standard_normal((B, 3)).astype(dtype)
    r = DataParallel(m, threads=2).loss_and_grads(x, eps)
    loss_b, recon, kl = m.forward_backward(m.params.with_own_grad(), x, eps)
    for got, rows in ((r.loss, loss_b), (r.recon, recon), (r.kl, kl)):
        want = np.mean(rows)
        assert type(got) is type(want) and got.tobytes() == want.tobytes()


# -- a NaN/Inf step is refused, and nothing changes ------------------------------------------------
def _state(model, opt):
    return [model.params.data.copy(), opt.t] + [getattr(opt, n).copy() for n in opt.state_names]


def _same_state(a, b):
    assert a[1] == b[1]
    for u, v in zip(a[:1] + a[2:], b[:1] + b[2:]):
        np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("make", [lambda P: minivae.SGD(P, lr=0.1, momentum=0.9),
                                  lambda P: minivae.Adam(P), lambda P: minivae.Adagrad(P)])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_opt_step_refuses_a_nan_or_inf_gradient_and_names_the_tensor(make, bad):
    m = minivae.VAE(784, 16, 2, seed=0, dtype="float64")
    x = np.random.default_rng(0).random((8, 784))
    opt = make(m.params)
    m.loss_and_grads(x)
    opt.step()                                        # a real step first: state to keep
    m.loss_and_grads(x)
    sl = m.params.layout.slice(m.params.layout.names[2])
    m.params.grad[sl.start + 3] = bad
    before = _state(m, opt)
    with pytest.raises(FloatingPointError, match=rf"the gradient of {m.params.layout.names[2]} "
                                                 r"holds NaN or Inf: no step taken"):
        opt.step()
    _same_state(before, _state(m, opt))
    dp = DataParallel(m, threads=2)
    with pytest.raises(FloatingPointError, match="holds NaN or Inf"):
        dp.optimizer_step(opt)
    _same_state(before, _state(m, opt))


@pytest.mark.parametrize("make", [lambda P: minivae.Adam(P),
                                  lambda P: minivae.SGD(P, lr=0.1, momentum=0.9)])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("which", ["data", "grad", "state", "a grad view", "a data view",
                                   "state strided", "state float64"])
def test_a_read_only_buffer_is_refused_before_the_step_changes_anything(make, threads, which):
    """A buffer the step writes made read-only, or an optimizer buffer replaced by one it cannot
    write (found by two helpers' attacks): before, the update failed half-way with its step
    already counted and the noise stream moved on, and the compiled plan wrote through a
    read-only view of the gradient. Now train_step and DataParallel's steps refuse at once with
    one line, and nothing has changed; so does opt.step() where it would write the buffer."""
    parallel.set_num_threads(threads)
    m = VAE(40, (16,), 3, seed=0)
    opt = make(m.params)
    x = (np.random.default_rng(0).random((9, 40)) < 0.3).astype(np.float32)
    minivae.train_step(m, opt, x)
    before, noise = _state(m, opt), m.rng.snapshot()
    name = opt.state_names[0]
    state = getattr(opt, name)
    if which.startswith("state "):
        setattr(opt, name, np.repeat(state, 2)[::2] if which == "state strided"
                else state.astype(np.float64))
        buf, match = None, f"optimizer's {name} is not a contiguous float32 array"
    else:
        buf = {"data": m.params.data, "grad": m.params.grad, "state": state,
               "a grad view": m.params.grad_views["enc.0.W"],
               "a data view": m.params.views["dec.0.b"]}[which]
        buf.flags.writeable = False
        match = "read-only"
    dp = DataParallel(m)
    steps = [lambda: minivae.train_step(m, opt, x), lambda: dp.train_step(opt, x),
             lambda: dp.optimizer_step(opt)]
    if "grad" not in which:                    # opt.step() reads the gradient only
        steps.append(opt.step)
    for step in steps:
        with pytest.raises(ValueError, match=f"{match}.*: no step taken, nothing changed$"):
            step()
        _same_state(before[:1] + before[1:2], _state(m, opt)[:2])
        assert m.rng.snapshot() == noise
    if "grad" in which:
        with pytest.raises(ValueError, match="read-only.*: nothing computed$"):
            dp.loss_and_grads(x)
        assert m.rng.snapshot() == noise
    if buf is not None:
        buf.flags.writeable = True
    setattr(opt, name, state)
    _same_state(before, _state(m, opt))
    minivae.train_step(m, opt, x)
    assert opt.t == before[1] + 1


@pytest.mark.parametrize("threads, batch", [(1, 64), (2, 64), (2, 2 * parallel.MIN_ROWS)])
def test_a_step_whose_loss_is_nan_updates_nothing(threads, batch):
    """train_step with a NaN in one row of the last row block (check=False lets it in): the
    loss is NaN, the step raises NonFiniteStep, and the parameters, Adam's moments and its
    step count are as before; at 2 x MIN_ROWS rows on 2 threads this is the row split, where
    the blocks decide together at their barrier before any update."""
    m = minivae.VAE(784, 32, 4, seed=0)
    opt = minivae.Adam(m.params)
    x = (np.random.default_rng(1).random((batch, 784)) > 0.5).astype(np.float32)
    dp = DataParallel(m, threads=threads)
    dp.train_step(opt, x)
    before = _state(m, opt)
    x[-1, 5] = np.nan
    with pytest.raises(minivae.NonFiniteStep, match="the update was not applied"):
        dp.train_step(opt, x, check=False)
    _same_state(before, _state(m, opt))
    x[-1, 5] = 1.0
    r = dp.train_step(opt, x)                         # and the next good step goes on as usual
    assert np.isfinite(float(r.loss)) and opt.t == before[1] + 1


def _nan_gradient_model(model_cls=VAE):
    """A Gaussian model whose loss is finite (about 3e5 nats) but whose gradient is NaN: a
    decoder bias of 1e37 behind zero weights (found by the second new-user attack)."""
    m = model_cls(784, (64,), 8, likelihood="gaussian", x_sigma=0.01, seed=0)
    g0, g2 = m.params.group("dec.0"), m.params.group("dec.2")
    g0["b"][:], g0["W"][:], g2["W"][:], g2["b"][:] = 1e37, 0.0, 0.0, 0.5
    return m


@pytest.mark.parametrize("model_cls", [VAE, Autoencoder])
@pytest.mark.parametrize("threads, batch", [(1, 64), (2, 64), (2, 4 * parallel.MIN_ROWS)])
def test_a_step_whose_gradient_is_nan_under_a_finite_loss_updates_nothing(model_cls, threads,
                                                                          batch):
    m = _nan_gradient_model(model_cls)
    opt = minivae.Adam(m.params)
    before = _state(m, opt)
    x = np.random.default_rng(0).random((batch, 784), dtype=np.float32)
    with pytest.raises(minivae.NonFiniteStep, match=r"the gradient holds NaN or Inf at this "
                                                     r"step \(the loss is finite\)"):
        DataParallel(m, threads=threads).train_step(opt, x)
    _same_state(before, _state(m, opt))


@pytest.mark.parametrize("threads", [1, 2])
def test_a_batch_loss_that_overflows_only_in_total_is_refused(threads):
    """Each row block's loss sum is finite but the batch's is Inf (decoder bias 5e16, squared
    in the Gaussian NLL): the row split's barrier checks the batch's sum, as _step computes
    it, not each block's."""
    m = VAE(784, (64,), 8, likelihood="gaussian", seed=0)
    m.params.group("dec.2")["W"][:] = 0.0
    m.params.group("dec.2")["b"][:] = 5e16
    opt = minivae.Adam(m.params)
    before = _state(m, opt)
    x = np.random.default_rng(0).random((2 * parallel.MIN_ROWS, 784), dtype=np.float32)
    with pytest.raises(minivae.NonFiniteStep, match="the training loss is inf"):
        DataParallel(m, threads=threads).train_step(opt, x)
    _same_state(before, _state(m, opt))


@pytest.mark.parametrize("threads", [2, 4])
def test_a_gradient_that_overflows_only_when_the_row_blocks_are_summed_is_refused(threads):
    """Each row block's gradient is finite, their sum is not (found by the third attack): an
    Autoencoder with all parameters 0 but a tiny decoder bias behind huge weights, on zero
    images. The row split sums the blocks' gradients, checks the sum, and only then decides."""
    m = Autoencoder(784, (400,), 20, seed=0)
    m.params.data[:] = 0.0
    m.params.group("dec.0")["b"][:] = 0.01 / 6e35
    m.params.group("dec.2")["W"][:] = 6e35
    opt = minivae.Adam(m.params)
    before = _state(m, opt)
    x = np.zeros((4 * parallel.MIN_ROWS, 784), dtype=np.float32)
    dp = DataParallel(m, threads=threads)
    with pytest.raises(minivae.NonFiniteStep, match=r"the gradient holds NaN or Inf"):
        dp.train_step(opt, x)
    _same_state(before, _state(m, opt))
