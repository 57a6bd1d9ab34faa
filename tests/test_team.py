"""The compiled thread team (minivae/engine/_kernels.c): OpenBLAS's parallel jobs run on it
(blas.team_backend) and Adam splits over it (kernels.parts), without changing a number, without
hanging when several threads, a fork or a busy team meet it. The cases that could hang run in
a child process with a time limit."""
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from minivae.engine import blas, kernels
from minivae.engine.threads import blas_threads

needs_team = pytest.mark.skipif(
    not (kernels.available() and blas.pinnable()
         and blas._symbol(blas._library(), "set_threads_callback_function") is not None),
    reason="needs the compiled kernels and an OpenBLAS >= 0.3.27 with a threads callback")

HYPER = (0.9, 0.1, 0.999, 1e-3, 3e-3, 1e-7, 1.0)


def child(code: str, timeout: float = 120, env=None) -> str:
    """Run code in a fresh Python with minivae; -> its stdout. Fails the test on a non-zero
    exit or a hang (the time limit)."""
    full_env = {**os.environ, "OPENBLAS_NUM_THREADS": "4", **(env or {})}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, timeout=timeout, env=full_env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def products(rng, dtype):
    """Products big enough for OpenBLAS to split over threads, in the layouts a step uses."""
    a = rng.standard_normal((128, 784)).astype(dtype)
    w = rng.standard_normal((784, 400)).astype(dtype)
    g = rng.standard_normal((128, 400)).astype(dtype)
    return [(a, w), (a.T, g), (g, w.T), (rng.standard_normal((33, 517)).astype(dtype),
                                          rng.standard_normal((517, 301)).astype(dtype))]


@needs_team
def test_products_on_the_team_are_openblas_pool_products_to_the_last_bit():
    out = child("""
        import numpy as np
        from minivae.engine import blas, kernels
        from minivae.engine.threads import blas_threads
        from test_team import products
        rng = np.random.default_rng(0)
        pairs = [p for dt in (np.float32, np.float64) for p in products(rng, dt)]
        with blas.openblas_pool(), blas_threads(3):      # OpenBLAS's own pool first
            pool = [a @ b for a, b in pairs]
        assert kernels.team_info()["workers"] == 0
        assert blas.team_backend()
        for k in (2, 3):
            with blas_threads(k):
                team = [a @ b for a, b in pairs]
            for x, y in zip(pool, team):
                if k == 3:
                    assert np.array_equal(x, y)
                else:                            # 2 threads: other ranges, same maths
                    np.testing.assert_allclose(x, y, rtol=1e-5 if x.dtype == np.float32 else 1e-12, atol=1e-3)
        print(kernels.team_info()["workers"])
    """, env={"PYTHONPATH": os.path.dirname(__file__)})
    assert int(out.split()[-1]) == 2        # the 3-thread products ran on the team's workers


@needs_team
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 15, 65536, 65537, 100003, 653000])
@pytest.mark.parametrize("k", [1, 3])
def test_adam_split_over_the_team_is_the_one_thread_pass_to_the_last_bit(rng, dtype, n, k):
    gs = [rng.standard_normal(n).astype(dtype) for _ in range(k)]
    p, m = (rng.standard_normal(n).astype(dtype) for _ in range(2))
    v = np.abs(rng.standard_normal(n)).astype(dtype)
    want = [a.copy() for a in (*gs, p, m, v)]
    kernels.adam(want[:k], *want[k:], *HYPER)
    for parts in (2, 3, 4):
        got = [a.copy() for a in (*gs, p, m, v)]
        with kernels.parts(parts):
            kernels.adam(got[:k], *got[k:], *HYPER)
        for x, y in zip(got, want):
            np.testing.assert_array_equal(x, y)
    if n >= 2 * 32768:                          # big enough to split: the team did
        assert kernels.team_info()["workers"] >= 1


def test_parts_nest_and_are_per_thread():
    import threading

    seen = []
    with kernels.parts(3):
        with kernels.parts(2):
            seen.append(kernels.current_parts())
        seen.append(kernels.current_parts())
        t = threading.Thread(target=lambda: seen.append(kernels.current_parts()))
        t.start()
        t.join()
    seen.append(kernels.current_parts())
    assert seen == [2, 3, 1, 1]


@needs_team
def test_many_threads_at_once_get_right_answers_and_never_hang():
    # four Python threads, each multiplying on 2 BLAS threads and running a split Adam, all at
    # once: the team takes one job at a time; a product waits for it, an Adam runs alone
    child("""
        import threading
        import numpy as np
        from minivae.engine import blas, kernels
        from minivae.engine.threads import blas_threads
        rng = np.random.default_rng(1)
        a = rng.standard_normal((256, 784)).astype(np.float32)
        w = rng.standard_normal((784, 400)).astype(np.float32)
        n = 200000
        base = [rng.standard_normal(n).astype(np.float32) for _ in range(3)]
        base.append(np.abs(rng.standard_normal(n)).astype(np.float32))
        with blas_threads(2):
            want_prod = a @ w
            want = [x.copy() for x in base]
            kernels.adam([want[0]], *want[1:], 0.9, 0.1, 0.999, 1e-3, 3e-3, 1e-7, 1.0)
        errors = []

        def work():
            try:
                for _ in range(40):
                    with blas_threads(2):
                        assert np.array_equal(a @ w, want_prod)
                    got = [x.copy() for x in base]
                    with kernels.parts(2):
                        kernels.adam([got[0]], *got[1:], 0.9, 0.1, 0.999, 1e-3, 3e-3, 1e-7, 1.0)
                    assert all(np.array_equal(x, y) for x, y in zip(got, want))
            except BaseException as e:
                errors.append(e)

        ts = [threading.Thread(target=work) for _ in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert not errors, errors
        assert blas.team_backend()
    """, timeout=180)


@needs_team
@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_forked_child_starts_its_own_team():
    child("""
        import os
        import numpy as np
        from minivae.engine import blas, kernels
        from minivae.engine.threads import blas_threads
        rng = np.random.default_rng(2)
        a = rng.standard_normal((128, 784)).astype(np.float32)
        w = rng.standard_normal((784, 400)).astype(np.float32)
        with blas_threads(2):
            want = a @ w
        assert blas.team_backend() and kernels.team_info()["workers"] == 1
        pid = os.fork()
        if pid == 0:                    # the child: no workers until it needs them
            ok = kernels.team_info()["workers"] == 0
            with blas_threads(2):
                ok = ok and np.array_equal(a @ w, want)
            x = np.ones(100000, np.float32)
            with kernels.parts(2):
                kernels.adam([x.copy()], x.copy(), x.copy(), x.copy(), 0.9, 0.1, 0.999, 1e-3,
                             1e-3, 1e-8, 1.0)
            ok = ok and kernels.team_info()["workers"] == 1
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, status
    """, timeout=120)


@needs_team
def test_the_environment_variable_keeps_openblas_own_threads():
    out = child("""
        import numpy as np
        from minivae.engine import blas, kernels
        from minivae.engine.threads import blas_threads
        a = np.ones((256, 784), np.float32)
        with blas_threads(2):
            a @ a.T
        print(blas.team_backend(), kernels.team_info()["workers"])
    """, env={"MINIVAE_BLAS_TEAM": "0"})
    assert out.split() == ["False", "0"]


@needs_team
@pytest.mark.parametrize("name, value, message", [
    ("MINIVAE_TEAM_SPIN_US", "soon", "MINIVAE_TEAM_SPIN_US must be a whole number of "
     "microseconds from 0 to 10000000, got 'soon'"),
    ("MINIVAE_TEAM_SPIN_US", "-1", "MINIVAE_TEAM_SPIN_US must be a whole number of "
     "microseconds from 0 to 10000000, got '-1'"),
    ("MINIVAE_TEAM_SPIN_US", "99999999999999999999", "MINIVAE_TEAM_SPIN_US must be a whole "
     "number of microseconds from 0 to 10000000, got '99999999999999999999'"),
    ("MINIVAE_BLAS_TEAM", "maybe", "MINIVAE_BLAS_TEAM must be 1 or 0 (true/false, yes/no, "
     "on/off), got 'maybe'"),
    ("MINIVAE_NUM_THREADS", "0", "MINIVAE_NUM_THREADS must be from 1 to 1024, got '0'"),
    ("MINIVAE_NUM_THREADS", "100000", "MINIVAE_NUM_THREADS must be from 1 to 1024, got '100000'"),
])
def test_bad_thread_settings_are_one_line_before_any_work(tmp_path, name, value, message):
    env = {**os.environ, name: value}
    out = subprocess.run([sys.executable, "-m", "minivae", "train", "--epochs", "1", "--out",
                          str(tmp_path / "run")], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["minivae train: error: " + message]
    assert not (tmp_path / "run").exists()


@needs_team
def test_more_threads_than_cores_never_start_more_blas_workers_than_cores():
    # --threads 64 at batch 7 on a 2-core machine took 60 ms a step when the BLAS got 64
    # threads (its jobs wait for each other); the step caps the BLAS at the usable cores
    out = child("""
        import numpy as np
        import minivae
        from minivae import VAE, Adam, DataParallel
        from minivae.engine import kernels, threads
        m = VAE(d_in=784, hidden=(400,), latent=20, seed=0)
        opt = Adam(m.params, lr=1e-3)
        dp = DataParallel(m, threads=64)
        x = (np.random.default_rng(0).random((7, 784)) < 0.3).astype(np.float32)
        for _ in range(3):
            r = dp.train_step(opt, x)
        assert np.isfinite(float(r.loss))
        print(kernels.team_info()["workers"], threads.usable_cores())
    """)
    workers, cores = map(int, out.split())
    assert workers <= cores - 1


@needs_team
def test_a_training_step_is_the_same_with_the_team_or_openblas_pool():
    # batch 64 on 2 threads: the pass on BLAS threads, then Adam split over the team
    out = child("""
        import numpy as np
        import minivae
        from minivae import VAE, Adam, DataParallel
        from minivae.engine import blas, kernels
        minivae.set_num_threads(2)
        x = (np.random.default_rng(3).random((64, 784)) < 0.3).astype(np.float32)
        eps = np.random.default_rng(4).standard_normal((64, 20)).astype(np.float32)
        res = []

        def run():
            m = VAE(d_in=784, hidden=(400,), latent=20, seed=0)
            opt = Adam(m.params, lr=1e-3)
            dp = DataParallel(m)
            for _ in range(3):
                dp.train_step(opt, x, eps=eps)
            res.append((m.params.data.copy(), opt.m.copy(), opt.v.copy()))

        with blas.openblas_pool():
            run()
        assert kernels.team_info()["workers"] == 0
        run()
        assert all(np.array_equal(a, b) for a, b in zip(*res))
        print(blas.team_backend(), kernels.team_info()["workers"])
    """)
    assert out.split() == ["True", "1"]


def _matrix_calls(rng, rows, cols, dtype):
    """Each (rows, cols) or flat kernel with fresh inputs -> (call(), outputs to compare)."""
    r = lambda *s: rng.standard_normal(s).astype(dtype)          # noqa: E731
    l, x, b = r(rows, cols), (rng.random((rows, cols)) < 0.3).astype(dtype), r(cols)
    e = -np.abs(l)
    calls = {
        "bias_relu": lambda o: kernels.bias_relu(o["out"].reshape(-1), b, rows, cols),
        "relu_grad_bias": lambda o: kernels.relu_grad_bias(
            o["src"].reshape(-1), l.reshape(-1), o["g"].reshape(-1), o["db"], rows, cols),
        "bernoulli_bias_negabs": lambda o: kernels.bernoulli_bias_negabs(
            o["l"].reshape(-1), b, o["e"].reshape(-1), rows, cols),
        "bernoulli_nll_grad_db": lambda o: kernels.bernoulli_nll_grad_db(
            l.reshape(-1), x.reshape(-1), e.reshape(-1), o["out"].reshape(-1), 1 / 7,
            o["db"], rows, cols),
        "bernoulli_nll_terms": lambda o: kernels.bernoulli_nll_terms(
            l.reshape(-1), x.reshape(-1), o["t"].reshape(-1)),
        "bernoulli_nll_grad": lambda o: kernels.bernoulli_nll_grad(
            l.reshape(-1), x.reshape(-1), e.reshape(-1), o["out"].reshape(-1), 1 / 7),
        "relu_grad_bias in place": lambda o: kernels.relu_grad_bias(
            o["g"].reshape(-1), l.reshape(-1), o["g"].reshape(-1), o["db"], rows, cols),
    }
    if kernels.numpy_loops():
        for bias in (None, b):
            calls[f"bernoulli_nll_rows, bias {bias is not None}"] = (
                lambda o, bias=bias: kernels.bernoulli_nll_rows(
                    o["l"].reshape(-1), bias, x.reshape(-1), o["e"].reshape(-1),
                    o["t"].reshape(-1), o["nll"], rows, cols))
    fresh = lambda: {"out": r(rows, cols), "src": r(rows, cols), "g": r(rows, cols),   # noqa: E731
                     "db": r(cols), "l": l.copy(), "e": r(rows, cols), "t": np.log1p(np.exp(e)),
                     "nll": r(rows)}
    return calls, fresh


@needs_team
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rows, cols", [(128, 784), (300, 401), (512, 784), (20, 16400),
                                        (100000, 1), (0, 784), (3, 17)])
def test_matrix_kernels_split_over_the_team_are_the_one_thread_pass_to_the_last_bit(
        rng, dtype, rows, cols):
    calls, fresh = _matrix_calls(rng, rows, cols, dtype)
    state = rng.bit_generator.state
    for name, call in calls.items():
        rng.bit_generator.state = state
        want = fresh()
        call(want)
        for parts in (2, 3, 4):
            rng.bit_generator.state = state
            got = fresh()
            with kernels.parts(parts):
                call(got)
            for key in want:
                np.testing.assert_array_equal(got[key], want[key], err_msg=f"{name}, {parts} parts, {key}")


@pytest.mark.parametrize("name", ["MINIVAE_BLAS_TEAM", "MINIVAE_KERNELS", "MINIVAE_NUM_THREADS",
                                  "MINIVAE_TEAM_SPIN_US"])
def test_an_empty_setting_means_unset_for_every_variable(name):
    """NAME= (empty) is the default for each of minivae's variables alike (MINIVAE_BLAS_TEAM=
    alone used to be an error)."""
    out = subprocess.run([sys.executable, "-m", "minivae", "info"], capture_output=True,
                         text=True, env={**os.environ, name: ""}, timeout=120)
    assert out.returncode == 0 and out.stderr == "", out.stderr


def _wait_for(cond, seconds=5.0):
    import time
    end = time.monotonic() + seconds
    while not cond() and time.monotonic() < end:
        time.sleep(0.01)
    return cond()


def test_a_team_replaced_by_a_bigger_one_stops_its_workers():
    """Raising the thread count makes a bigger Python team; the old one's workers used to
    wait on their queues for the rest of the process (1 -> 6 threads left 6 idle workers
    beside the 5 in use). Retired, they stop, now or when a run in progress ends, and the old
    team still runs what it is given, in the caller."""
    from minivae.engine.threads import Team

    old = Team(4)
    assert old.run([lambda i=i: i * i for i in range(4)]) == [0, 1, 4, 9]
    assert len(old._threads) == 3 and all(t.is_alive() for t in old._threads)
    started, go = threading.Event(), threading.Event()

    def slow():
        started.set()
        go.wait(5)
        return "done"

    out = []
    runner = threading.Thread(target=lambda: out.append(old.run([slow, lambda: 1])))
    runner.start()
    assert started.wait(5)
    old.retire()                         # a run is in progress: the workers stop as it ends
    assert all(t.is_alive() for t in old._threads)
    go.set()
    runner.join(5)
    assert out == [["done", 1]]
    assert _wait_for(lambda: not any(t.is_alive() for t in old._threads))
    assert old.run([lambda: 2, lambda: 3]) == [2, 3]          # in the caller now
    assert old.run([lambda: 2, lambda: 3], concurrent=True) is None


def test_growing_the_shared_team_retires_the_old_one():
    from minivae.engine import threads as T

    k = (T._team.k if T._team is not None else 1) + 2
    old = T.team(k - 1)
    assert all(t.is_alive() for t in old._threads) and len(old._threads) == k - 2
    new = T.team(k)
    assert new is not old and new.k == k
    # the old team's own workers end (other teams' threads come and go in a full test run)
    assert _wait_for(lambda: not any(t.is_alive() for t in old._threads))
    assert all(t.is_alive() for t in new._threads)
    assert new.run([lambda i=i: i for i in range(k)]) == list(range(k))
