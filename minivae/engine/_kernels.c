/* minivae.engine._kernels: one-pass CPU kernels for the NumPy training step (optional, compiled at
 * install time; minivae runs its NumPy twins where this module is missing, see kernels.py).
 *
 * Why C: the step's elementwise updates are memory-bound. NumPy runs one operation per pass
 * over the flat buffers, so Adam with the gradient sum over k threads' buffers costs about
 * 7 + (k - 1) passes over 2.6 MB arrays; here it is one pass. The maths is the same as
 * minivae/engine/optim.py's NumPy Adam (adam_update_numpy), operation for operation
 * (no fused multiply-adds: -ffp-contract=off),
 * so the result does not depend on the CPU's instruction set.
 *
 * The arrays are any C-contiguous buffers (NumPy arrays) of float32 or float64, one
 * dimension, equal length. The GIL is released in the loops, so threads can update disjoint
 * slices of the same buffers at once (minivae.parallel).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <float.h>
#include <math.h>
#include <string.h>

/* sqrt and division dominate once the data are in cache: on x86-64 Linux, GCC also compiles
 * the loops for AVX2 (8 floats a vector, not SSE2's 4) and picks the version at load time.
 * Vector width changes no result: each sqrt, division, product and sum is still one
 * correctly rounded IEEE operation. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VECTOR_CLONES
#endif

#define MAX_GRADS 64
#define BLOCK 2048  /* numbers summed then updated while they are in L1 */
#define MIN_PART (1 << 15) /* numbers a part at least: below, a hand-off costs more than it saves */

/* ----------------------------------------------------------------------------------------- */
/* Adam on [0, n): g = gs[0] + gs[1] + ... (left to right, stored back into gs[0]), then
 *   m <- b1 m + c1 g;   v <- b2 v + c2 g^2;   p <- decay p - step (m / (sqrt(v) + eps))
 * with c1 = 1 - b1, c2 = 1 - b2, step = (lr / (1 - b1^t)) * sqrt(1 - b2^t),
 * eps = eps_adam * sqrt(1 - b2^t), decay = 1 - lr wd (AdamW) or 1.
 * One departure from the formula: an m below the smallest normal number (TINY) is stored as 0.
 * A parameter whose gradient became exactly 0 (a dead ReLU unit) has its m shrink by b1 a
 * step, into subnormals after ~800 steps, where x86 arithmetic is ~100x slower (the 784-400-20
 * step went from 1.8 to 4.5 ms). The update that m would have made, step m / (sqrt(v) + eps),
 * is below step * TINY / eps (1e-33 in float32 with the default eps): it can change only a
 * parameter within about that of 0. v is kept exact: a tiny but live gradient (|g| < 1e-19 in
 * float32) leaves v subnormal with m normal, and there the update is not negligible. */
/* g[0, len) <- gs[0] + gs[1] + ... + gs[k-1] over the block at lo, added left to right */
#define SUM_GRADS(T)                                                                      \
    for (int j = 1; j < k; j++) {                                                         \
        const T *restrict h = gs[j] + lo;                                                 \
        for (Py_ssize_t i = 0; i < len; i++) g[i] += h[i];                                \
    }

#define DEFINE_ADAM(NAME, T, SQRT, TINY)                                                      \
    VECTOR_CLONES static void NAME(T **gs, int k, T *p, T *m, T *v, Py_ssize_t n, T b1, T c1, T b2,     \
                     T c2, T step, T eps, T decay)                                        \
    {                                                                                     \
        for (Py_ssize_t lo = 0; lo < n; lo += BLOCK) {                                    \
            Py_ssize_t len = n - lo < BLOCK ? n - lo : BLOCK;                             \
            T *restrict g = gs[0] + lo;                                                   \
            SUM_GRADS(T)                                                                  \
            T *restrict pp = p + lo, *restrict mm = m + lo, *restrict vv = v + lo;        \
            for (Py_ssize_t i = 0; i < len; i++) {                                        \
                T gi = g[i];                                                              \
                T mi = b1 * mm[i] + c1 * gi;                                              \
                T vi = b2 * vv[i] + c2 * (gi * gi);                                       \
                mi = (mi < TINY && mi > -TINY) ? (T)0 : mi; /* no subnormal m: see below */\
                mm[i] = mi;                                                               \
                vv[i] = vi;                                                               \
                pp[i] = decay * pp[i] - step * (mi / (SQRT(vi) + eps));                   \
            }                                                                             \
        }                                                                                 \
    }

DEFINE_ADAM(adam_f32, float, sqrtf, FLT_MIN)
DEFINE_ADAM(adam_f64, double, sqrt, DBL_MIN)

/* SGD with momentum on [0, n) (minivae/optim.py: SGD.update after its first step, torch's
 * form), g = gs[0] + gs[1] + ... (stored back into gs[0]), then
 *   b <- mu b + g;   p <- p - lr b
 * with Adam's one departure: a b below the smallest normal number is stored as 0. With a
 * gradient of exactly 0 (a dead ReLU unit) b shrinks by mu a step, into subnormals after
 * ~800 steps at mu = 0.9, where x86 arithmetic is ~100x slower; the update such a b would make
 * is below lr * TINY (1e-40 at lr 0.01, float32). */
#define DEFINE_SGD_MOMENTUM(NAME, T, TINY)                                                  \
    VECTOR_CLONES static void NAME(T **gs, int k, T *p, T *b, Py_ssize_t n, T mu, T lr)    \
    {                                                                                     \
        for (Py_ssize_t lo = 0; lo < n; lo += BLOCK) {                                    \
            Py_ssize_t len = n - lo < BLOCK ? n - lo : BLOCK;                             \
            T *restrict g = gs[0] + lo;                                                   \
            SUM_GRADS(T)                                                                  \
            T *restrict pp = p + lo, *restrict bb = b + lo;                               \
            for (Py_ssize_t i = 0; i < len; i++) {                                        \
                T bi = mu * bb[i] + g[i];                                                 \
                bi = (bi < TINY && bi > -TINY) ? (T)0 : bi;                               \
                bb[i] = bi;                                                               \
                pp[i] = pp[i] - lr * bi;                                                  \
            }                                                                             \
        }                                                                                 \
    }

DEFINE_SGD_MOMENTUM(sgd_momentum_f32, float, FLT_MIN)
DEFINE_SGD_MOMENTUM(sgd_momentum_f64, double, DBL_MIN)

/* ----------------------------------------------------------------------------------------- */
/* The Bernoulli likelihood on logits l and data x, around NumPy's SIMD exp and log1p
 * (minivae/losses.py, bernoulli_nll_numpy and its backward): with e = exp(-|l|) and
 * t = log1p(e), the per-pixel negative log-likelihood is
 *     t <- (t + max(l, 0)) - x l                 [softplus(l) - x l]
 * where max(l, 0) is np.maximum(l, 0.0): l where l > 0 or l is NaN, else +0 (at l = -inf
 * the earlier (|l| + l) / 2 gave inf - inf = NaN where the reference gives 0)
 * and its gradient, scaled, is
 *     out <- (P (1 - x) - Q x) / (e + 1) * scale, with (P, Q) = (1, e) if l >= 0, else (e, 1)
 * (sigmoid(l) - x without cancellation). */
#define DEFINE_BERNOULLI(SUFFIX, T)                                                       \
    VECTOR_CLONES static void nll_terms_##SUFFIX(const T *l, const T *x, T *t,           \
                                                 Py_ssize_t n)                            \
    {                                                                                     \
        for (Py_ssize_t i = 0; i < n; i++)                                                \
            t[i] = (t[i] + ((l[i] > 0 || l[i] != l[i]) ? l[i] : (T)0)) - x[i] * l[i];      \
    }                                                                                     \
    VECTOR_CLONES static void nll_grad_##SUFFIX(const T *l, const T *x, const T *e,      \
                                                T *out, Py_ssize_t n, T scale)            \
    {                                                                                     \
        for (Py_ssize_t i = 0; i < n; i++) {                                              \
            T P = l[i] >= 0 ? (T)1 : e[i], Q = l[i] >= 0 ? e[i] : (T)1;                   \
            out[i] = (P * ((T)1 - x[i]) - Q * x[i]) / (e[i] + (T)1) * scale;              \
        }                                                                                 \
    }

DEFINE_BERNOULLI(f32, float)
DEFINE_BERNOULLI(f64, double)

/* The decoder's last bias, folded into the likelihood's first and last passes:
 *     l[i, j] <- l[i, j] + b[j];  e[i, j] <- -|l[i, j]|            (before exp and log1p)
 *     out[i, j] as nll_grad above;  db[j] <- sum_i out[i, j]          (rows added in order) */
#define DEFINE_BERNOULLI_BIAS(SUFFIX, T, ABS)                                             \
    VECTOR_CLONES static void bias_negabs_##SUFFIX(T *restrict l, const T *restrict b,   \
                                                   T *restrict e, Py_ssize_t rows,        \
                                                   Py_ssize_t cols, Py_ssize_t ld)        \
    {                                                                                     \
        for (Py_ssize_t i = 0; i < rows; i++) {                                           \
            T *restrict li = l + i * ld, *restrict ei = e + i * ld;                       \
            for (Py_ssize_t j = 0; j < cols; j++) {                                       \
                T y = li[j] + b[j];                                                       \
                li[j] = y;                                                                \
                ei[j] = -ABS(y);                                                          \
            }                                                                             \
        }                                                                                 \
    }                                                                                     \
    VECTOR_CLONES static void nll_grad_db_##SUFFIX(const T *restrict l, const T *restrict x, \
                                                   const T *restrict e, T *restrict out,  \
                                                   T *restrict db, Py_ssize_t rows,       \
                                                   Py_ssize_t cols, Py_ssize_t ld, T scale)\
    {                                                                                     \
        for (Py_ssize_t j = 0; j < cols; j++) db[j] = (T)0;                               \
        for (Py_ssize_t i = 0; i < rows; i++) {                                           \
            Py_ssize_t o = i * ld;                                                        \
            for (Py_ssize_t j = 0; j < cols; j++) {                                       \
                T li = l[o + j], ei = e[o + j], xi = x[o + j];                            \
                T P = li >= 0 ? (T)1 : ei, Q = li >= 0 ? ei : (T)1;                       \
                T v = (P * ((T)1 - xi) - Q * xi) / (ei + (T)1) * scale;                   \
                out[o + j] = v;                                                           \
                db[j] += v;                                                               \
            }                                                                             \
        }                                                                                 \
    }

DEFINE_BERNOULLI_BIAS(f32, float, fabsf)
DEFINE_BERNOULLI_BIAS(f64, double, fabs)

/* ----------------------------------------------------------------------------------------- */
/* A Dense layer's bias and the ReLU after it, forward and backward, each in one pass over the
 * (rows, cols) activations (minivae/layers.py: Dense.forward's out += b, then ReLU's
 * max(out, 0); ReLU.backward's dout * [out > 0], then Dense.backward's db = sum over rows):
 *     out[i, j] <- max(out[i, j] + b[j], 0)                      (NaN stays NaN, as np.maximum)
 *     g[i, j] <- src[i, j] * [out[i, j] > 0];  db[j] <- sum_i g[i, j]   (rows added in order)
 * (src may be g itself). Measured at batch 128, 2 cores: 3% off the forward+backward. */
#define DEFINE_BIAS_RELU(SUFFIX, T)                                                       \
    VECTOR_CLONES static void bias_relu_##SUFFIX(T *out, const T *restrict b,            \
                                                 Py_ssize_t rows, Py_ssize_t cols,        \
                                                 Py_ssize_t ld)                           \
    {                                                                                     \
        for (Py_ssize_t i = 0; i < rows; i++) {                                           \
            T *restrict o = out + i * ld;                                                 \
            for (Py_ssize_t j = 0; j < cols; j++) {                                       \
                T y = o[j] + b[j];                                                        \
                o[j] = (y > (T)0 || y != y) ? y : (T)0;                                   \
            }                                                                             \
        }                                                                                 \
    }                                                                                     \
    VECTOR_CLONES static void relu_grad_bias_##SUFFIX(const T *src, const T *restrict c, \
                                                      T *g, T *restrict db,               \
                                                      Py_ssize_t rows, Py_ssize_t cols,   \
                                                      Py_ssize_t ld)                      \
    {                                                                                     \
        for (Py_ssize_t j = 0; j < cols; j++) db[j] = (T)0;                               \
        for (Py_ssize_t i = 0; i < rows; i++) {                                           \
            const T *si = src + i * ld, *restrict ci = c + i * ld;                        \
            T *gi = g + i * ld;                                                           \
            for (Py_ssize_t j = 0; j < cols; j++) {                                       \
                T v = si[j] * (T)(ci[j] > (T)0);                                          \
                gi[j] = v;                                                                \
                db[j] += v;                                                               \
            }                                                                             \
        }                                                                                 \
    }

DEFINE_BIAS_RELU(f32, float)
DEFINE_BIAS_RELU(f64, double)

/* The pieces the team runs in two steps, so that a bias gradient still adds its rows in
 * order whatever the number of threads (relu_grad_bias and nll_grad_db above, cut by rows):
 *     e[i] <- -|l[i]|                     (the likelihood's first step, with no bias)
 *     g[i] <- src[i] * [c[i] > 0]          (the ReLU mask alone; src may be g)
 *     db[j] <- sum_i g[i, j]               (rows added in order, as the one-pass kernels) */
#define DEFINE_PIECES(SUFFIX, T, ABS)                                                     \
    VECTOR_CLONES static void negabs_##SUFFIX(const T *restrict l, T *restrict e,        \
                                              Py_ssize_t n)                               \
    {                                                                                     \
        for (Py_ssize_t i = 0; i < n; i++) e[i] = -ABS(l[i]);                             \
    }                                                                                     \
    VECTOR_CLONES static void relu_grad_##SUFFIX(const T *src, const T *restrict c, T *g, \
                                                 Py_ssize_t n)                            \
    {                                                                                     \
        for (Py_ssize_t i = 0; i < n; i++) g[i] = src[i] * (T)(c[i] > (T)0);              \
    }                                                                                     \
    VECTOR_CLONES static void col_sum_##SUFFIX(const T *restrict g, T *restrict db,      \
                                               Py_ssize_t rows, Py_ssize_t cols,          \
                                               Py_ssize_t ld)                             \
    {                                                                                     \
        for (Py_ssize_t j = 0; j < cols; j++) db[j] = (T)0;                               \
        for (Py_ssize_t i = 0; i < rows; i++) {                                           \
            const T *restrict gi = g + i * ld;                                            \
            for (Py_ssize_t j = 0; j < cols; j++) db[j] += gi[j];                         \
        }                                                                                 \
    }

DEFINE_PIECES(f32, float, fabsf)
DEFINE_PIECES(f64, double, fabs)

/* ----------------------------------------------------------------------------------------- */
/* NumPy's own inner loops for exp, log1p and add, so that the likelihood's forward runs on
 * the team, rows by rows, with NumPy's numbers: the same SIMD exp and log1p as np.exp and
 * np.log1p (each number's result does not depend on where a slice starts; the tests check it
 * to the bit), and np.sum(t, axis=1) as NumPy computes it: out = 0, then the add loop reduces
 * the row into it (NumPy's pairwise summation). They are found through the head of NumPy's
 * PyUFuncObject (numpy/ufuncobject.h; public, and part of NumPy's ABI since 1.0), checked
 * against what the ufunc says of itself in Python (name, nin, nout, nargs, ntypes and the
 * signature at the loop's index): where anything disagrees, numpy_loops() returns False and
 * minivae calls np.exp, np.log1p and np.sum as before. */
typedef void (*np_loop_fn)(char **args, const Py_ssize_t *dims, const Py_ssize_t *steps,
                           void *data);
typedef struct {
    np_loop_fn fn;
    void *data;
} NpLoop;
static NpLoop np_exp[2], np_log1p[2], np_add[2]; /* [0]: float32, [1]: float64 */
static int np_loops_found;

typedef struct {
    PyObject_HEAD
    int nin, nout, nargs;
    int identity;
    np_loop_fn *functions;
    void *const *data;
    int ntypes;
    int reserved1;
    const char *name;
    const char *types;
} UFuncHead;

#define NPY_FLOAT_NUM 11   /* NPY_FLOAT and NPY_DOUBLE in NumPy's type numbers (its ABI) */
#define NPY_DOUBLE_NUM 12

static int attr_int(PyObject *obj, const char *name, long *out)
{
    PyObject *v = PyObject_GetAttrString(obj, name);
    if (v == NULL) return -1;
    *out = PyLong_AsLong(v);
    Py_DECREF(v);
    return (*out == -1 && PyErr_Occurred()) ? -1 : 0;
}

/* The loop of `ufunc` whose Python signature is sig (e.g. "f->f"), with type number `num` for
 * each of its nargs arguments -> 1 (found, into *out), 0 (not found or not as expected), or -1
 * (a Python error set). */
static int find_loop(PyObject *ufunc, const char *name, const char *sig, int nargs, char num,
                     NpLoop *out)
{
    if (strcmp(Py_TYPE(ufunc)->tp_name, "numpy.ufunc") != 0) return 0;
    UFuncHead *u = (UFuncHead *)ufunc;
    long nin, nout, n_args, ntypes;
    if (attr_int(ufunc, "nin", &nin) < 0 || attr_int(ufunc, "nout", &nout) < 0 ||
        attr_int(ufunc, "nargs", &n_args) < 0 || attr_int(ufunc, "ntypes", &ntypes) < 0)
        return -1;
    if (u->nin != nin || u->nout != nout || u->nargs != n_args || u->ntypes != ntypes ||
        u->nargs != nargs || u->name == NULL || strcmp(u->name, name) != 0 ||
        u->functions == NULL || u->types == NULL)
        return 0;
    PyObject *types = PyObject_GetAttrString(ufunc, "types");
    if (types == NULL) return -1;
    int found = 0;
    if (PyList_Check(types) && PyList_GET_SIZE(types) == ntypes) {
        for (Py_ssize_t i = 0; i < ntypes && !found; i++) {
            const char *t = PyUnicode_AsUTF8(PyList_GET_ITEM(types, i));
            if (t == NULL) {
                Py_DECREF(types);
                return -1;
            }
            if (strcmp(t, sig) != 0) continue;
            int ok = u->functions[i] != NULL;
            for (int a = 0; a < nargs; a++) ok = ok && u->types[i * nargs + a] == num;
            if (ok) {
                out->fn = u->functions[i];
                out->data = u->data ? u->data[i] : NULL;
                found = 1;
            } else {
                break;      /* the Python signature and the C table disagree: not as expected */
            }
        }
    }
    Py_DECREF(types);
    return found;
}

static PyObject *numpy_loops(PyObject *self, PyObject *args)
{
    PyObject *exp_u, *log1p_u, *add_u;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOO:numpy_loops", &exp_u, &log1p_u, &add_u)) return NULL;
    NpLoop e[2], l[2], a[2];
    int r[6] = {find_loop(exp_u, "exp", "f->f", 2, NPY_FLOAT_NUM, &e[0]),
                find_loop(exp_u, "exp", "d->d", 2, NPY_DOUBLE_NUM, &e[1]),
                find_loop(log1p_u, "log1p", "f->f", 2, NPY_FLOAT_NUM, &l[0]),
                find_loop(log1p_u, "log1p", "d->d", 2, NPY_DOUBLE_NUM, &l[1]),
                find_loop(add_u, "add", "ff->f", 3, NPY_FLOAT_NUM, &a[0]),
                find_loop(add_u, "add", "dd->d", 3, NPY_DOUBLE_NUM, &a[1])};
    int all = 1;
    for (int i = 0; i < 6; i++) {
        if (r[i] < 0) return NULL;
        all = all && r[i] == 1;
    }
    if (all) {
        for (int k = 0; k < 2; k++) {
            np_exp[k] = e[k];
            np_log1p[k] = l[k];
            np_add[k] = a[k];
        }
        np_loops_found = 1;
    }
    return PyBool_FromLong(all);
}

/* ----------------------------------------------------------------------------------------- */
/* A small team of worker threads for the step of a batch too small to split over threads
 * (minivae/engine/threads.py, MIN_ROWS): it runs OpenBLAS's parallel jobs (blas_callback below,
 * installed by minivae/engine/blas.py: team_backend) and slices of the compiled kernels here.
 *
 * Why not Python threads: a hand-off through a Python queue costs ~67 us here (a wake-up and
 * the GIL), against ~3 us for a worker that is awake (Adam over 131k numbers: 69 us on one
 * thread, 37.5 us on two), and Adam over the default model's 653k numbers is ~0.4 ms. Why one
 * pool for the products and the kernels: OpenBLAS's own idle workers spin on the cores a
 * second pool needs (Adam on two threads took 0.46 ms after a product on OpenBLAS's pool, 0.20
 * on this one). Why not OpenMP: its idle workers spin without yielding. These workers, after
 * each job, stay awake calling sched_yield() (as OpenBLAS's do: a thread with real work on the
 * same core gets it at once) for team_spin_ns, then sleep on a condition variable.
 *
 * A job is fn(arg, part, parts) for part = 0 (the caller) .. parts - 1 (the workers): each
 * part writes its own slice, so the result does not depend on the number of parts. One job at
 * a time: a kernel that finds the team busy (another Python thread's job) runs the whole job
 * itself; a product waits for the team (its jobs must run at once). After fork() the child
 * starts with no workers (pthread_atfork). */
#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#include <sched.h>
#include <time.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#define HAVE_TEAM 1
#define MAX_TEAM 255  /* workers at most; a product asking for more jobs gets threads of its own */
#define MAX_SPIN_US 10000000LL  /* kernels.MAX_SPIN_US */
static long long team_spin_ns = 10000000; /* awake after a job; MINIVAE_TEAM_SPIN_US */

typedef void (*team_fn)(void *arg, int part, int parts);

static pthread_mutex_t team_busy = PTHREAD_MUTEX_INITIALIZER; /* held for a whole job */
static pthread_mutex_t team_lock = PTHREAD_MUTEX_INITIALIZER; /* guards sleeping, the cond */
static pthread_cond_t team_wake = PTHREAD_COND_INITIALIZER;
static int team_workers;         /* worker threads started (in this process) */
static int team_sleeping;        /* workers waiting on team_wake */
static unsigned long team_posted;/* job number: a worker runs its part when it changes */
static int team_done;            /* workers finished with the current job */
static team_fn team_job_fn;
static void *team_job_arg;
static int team_job_parts;
static unsigned long team_start_gen[MAX_TEAM + 1];
static __thread int team_in_job;   /* this thread is running a part of a team job */

static long long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void *team_worker(void *arg)
{
    int part = (int)(Py_intptr_t)arg;
    unsigned long seen = team_start_gen[part];
    for (;;) {
        unsigned long now = __atomic_load_n(&team_posted, __ATOMIC_ACQUIRE);
        if (now == seen) {
            long long until = now_ns() + __atomic_load_n(&team_spin_ns, __ATOMIC_RELAXED);
            do {
                sched_yield();
                now = __atomic_load_n(&team_posted, __ATOMIC_ACQUIRE);
            } while (now == seen && now_ns() < until);
        }
        if (now == seen) {
            pthread_mutex_lock(&team_lock);
            team_sleeping++;
            while ((now = __atomic_load_n(&team_posted, __ATOMIC_ACQUIRE)) == seen)
                pthread_cond_wait(&team_wake, &team_lock);
            team_sleeping--;
            pthread_mutex_unlock(&team_lock);
        }
        seen = now;
        team_in_job = 1;
        if (part < team_job_parts) team_job_fn(team_job_arg, part, team_job_parts);
        team_in_job = 0;
        __atomic_fetch_add(&team_done, 1, __ATOMIC_RELEASE);
    }
    return NULL;
}

static void team_after_fork(void)
{   /* the child has only the thread that forked: no workers, nothing in progress */
    pthread_mutex_init(&team_busy, NULL);
    pthread_mutex_init(&team_lock, NULL);
    pthread_cond_init(&team_wake, NULL);
    team_workers = team_sleeping = team_done = 0;
}

/* Start workers until there are `want` (or pthread_create fails); call with team_busy held. */
static void team_grow(int want)
{
    while (team_workers < want) {
        pthread_t id;
        pthread_attr_t attr;
        int part = team_workers + 1, ok;
        team_start_gen[part] = team_posted;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pthread_attr_setstacksize(&attr, 1 << 20);   /* OpenBLAS's kernels run here too */
        ok = pthread_create(&id, &attr, team_worker, (void *)(Py_intptr_t)part) == 0;
        pthread_attr_destroy(&attr);
        if (!ok) break;
        team_workers++;
    }
}

/* Post fn to the workers as `parts` parts, run part 0 here, wait for the rest; call with
 * team_busy held and 2 <= parts <= 1 + team_workers. */
static void team_post(team_fn fn, void *arg, int parts)
{
    team_job_fn = fn;
    team_job_arg = arg;
    team_job_parts = parts;
    __atomic_store_n(&team_done, 0, __ATOMIC_RELAXED);
    pthread_mutex_lock(&team_lock);
    __atomic_store_n(&team_posted, team_posted + 1, __ATOMIC_RELEASE);
    if (team_sleeping) pthread_cond_broadcast(&team_wake);
    pthread_mutex_unlock(&team_lock);
    team_in_job = 1;
    fn(arg, 0, parts);
    team_in_job = 0;
    while (__atomic_load_n(&team_done, __ATOMIC_ACQUIRE) < team_workers) sched_yield();
}

/* Run fn over parts = min(threads, 1 + workers) parts; call without the GIL. A caller that
 * finds the team busy runs the whole job itself. */
static void team_run(team_fn fn, void *arg, int threads)
{
    if (threads > MAX_TEAM + 1) threads = MAX_TEAM + 1;
    if (threads < 2 || pthread_mutex_trylock(&team_busy) != 0) {
        fn(arg, 0, 1);
        return;
    }
    team_grow(threads - 1);
    int parts = threads < team_workers + 1 ? threads : team_workers + 1;
    if (parts < 2) fn(arg, 0, 1);
    else team_post(fn, arg, parts);
    pthread_mutex_unlock(&team_busy);
}

/* OpenBLAS's threads callback (OpenBLAS >= 0.3.27, cblas.h: openblas_threads_callback): run
 * dojob(i, jobdata + i * elsize, dojob_data) for the numjobs jobs of one parallel product, all
 * at once (its jobs wait for each other's packed panels, so one thread cannot run two). The
 * team does it instead of OpenBLAS's own pool: one pool for the products and the elementwise
 * passes, so no idle pool spins on the cores the other needs. Results are OpenBLAS's own: the
 * same jobs over the same ranges, only run by other threads. */
typedef void (*blas_dojob)(int thread_num, void *jobdata, int dojob_data);
typedef struct {
    blas_dojob dojob;
    char *data;
    size_t elsize;
    int dojob_data;
} BlasJob;

static void blas_part(void *arg, int part, int parts)
{
    BlasJob *b = arg;
    (void)parts;
    b->dojob(part, b->data + (size_t)part * b->elsize, b->dojob_data);
}

typedef struct {
    BlasJob *job;
    int part;
} BlasPart;

static void *blas_part_thread(void *arg)
{
    BlasPart *bp = arg;
    team_in_job = 1;           /* a product nested in here gets fresh threads too */
    blas_part(bp->job, bp->part, 0);
    return NULL;
}

/* The jobs on threads made for this call: for a product asked for from inside a team job
 * (OpenBLAS does not do this today), with more jobs than MAX_TEAM + 1, or when the team cannot
 * grow. Slow, never a deadlock. */
static void blas_fresh_threads(BlasJob *job, int numjobs)
{
    pthread_t *ids = malloc(sizeof(pthread_t) * (size_t)numjobs);
    BlasPart *parts = malloc(sizeof(BlasPart) * (size_t)numjobs);
    if (ids == NULL || parts == NULL) {
        fprintf(stderr, "minivae: out of memory starting threads for OpenBLAS's %d jobs\n",
                numjobs);
        abort();       /* the jobs wait for each other: running fewer would hang */
    }
    for (int i = 1; i < numjobs; i++) {
        parts[i].job = job;
        parts[i].part = i;
        if (pthread_create(&ids[i], NULL, blas_part_thread, &parts[i]) != 0) {
            fprintf(stderr, "minivae: cannot start a thread for OpenBLAS's job %d of %d\n", i,
                    numjobs);
            abort();   /* the jobs wait for each other: running fewer would hang */
        }
    }
    int was = team_in_job;
    team_in_job = 1;
    blas_part(job, 0, numjobs);
    team_in_job = was;
    for (int i = 1; i < numjobs; i++) pthread_join(ids[i], NULL);
    free(ids);
    free(parts);
}

static void blas_callback(int sync, blas_dojob dojob, int numjobs, size_t elsize, void *jobdata,
                          int dojob_data)
{
    BlasJob job = {dojob, jobdata, elsize, dojob_data};
    (void)sync;                 /* OpenBLAS passes 1: return when the jobs are done */
    if (numjobs <= 1) {
        if (numjobs == 1) dojob(0, jobdata, dojob_data);
        return;
    }
    if (team_in_job) {                /* nested in a team job, whose caller holds the team */
        blas_fresh_threads(&job, numjobs);
        return;
    }
    /* Held for the whole product, on the team or on fresh threads: besides one job at a time
     * for the workers, it keeps OpenBLAS's per-job-index scratch buffers (blas_thread_buffer
     * [i], used by job i >= 1) to one product at a time, as OpenBLAS's own pool does. */
    pthread_mutex_lock(&team_busy);   /* another caller's job: wait, never run alone */
    if (numjobs - 1 <= MAX_TEAM) team_grow(numjobs - 1);
    if (team_workers < numjobs - 1)
        blas_fresh_threads(&job, numjobs);
    else
        team_post(blas_part, &job, numjobs);
    pthread_mutex_unlock(&team_busy);
}
#else
#define HAVE_TEAM 0
typedef void (*team_fn)(void *arg, int part, int parts);
static void team_run(team_fn fn, void *arg, int threads)
{
    (void)threads;
    fn(arg, 0, 1);
}
#endif

/* [lo, hi) of part `part` of n numbers (or rows, or columns) in `parts` parts, cut at
 * multiples of 16. A flat slice then starts at a multiple of 64 bytes (float32) from the
 * buffer's start; a cut by columns still shares a cache line per row where the row length is
 * not a multiple of 16 (results are the same; only speed can suffer). */
static void part_range(Py_ssize_t n, int part, int parts, Py_ssize_t *lo, Py_ssize_t *hi)
{
    Py_ssize_t q = (n + 15) / 16;
    *lo = part == 0 ? 0 : (q * part / parts) * 16;
    *hi = part == parts - 1 ? n : (q * (part + 1) / parts) * 16;
    if (*lo > n) *lo = n;
    if (*hi > n) *hi = n;
}

typedef struct {
    void **gs;
    int k, f32;
    void *p, *m, *v;  /* SGD: m is the momentum buffer, v unused */
    Py_ssize_t n;
    double b1, c1, b2, c2, step, eps, decay;  /* SGD: b1 = mu, step = lr */
    int sgd;
} AdamJob;

static void adam_part(void *arg, int part, int parts)
{
    AdamJob *a = arg;
    Py_ssize_t lo, hi;
    part_range(a->n, part, parts, &lo, &hi);
    if (hi <= lo) return;
    if (a->sgd && a->f32) {
        float *gs[MAX_GRADS];
        for (int j = 0; j < a->k; j++) gs[j] = (float *)a->gs[j] + lo;
        sgd_momentum_f32(gs, a->k, (float *)a->p + lo, (float *)a->m + lo, hi - lo,
                         (float)a->b1, (float)a->step);
    } else if (a->sgd) {
        double *gs[MAX_GRADS];
        for (int j = 0; j < a->k; j++) gs[j] = (double *)a->gs[j] + lo;
        sgd_momentum_f64(gs, a->k, (double *)a->p + lo, (double *)a->m + lo, hi - lo, a->b1,
                         a->step);
    } else if (a->f32) {
        float *gs[MAX_GRADS];
        for (int j = 0; j < a->k; j++) gs[j] = (float *)a->gs[j] + lo;
        adam_f32(gs, a->k, (float *)a->p + lo, (float *)a->m + lo, (float *)a->v + lo, hi - lo,
                 (float)a->b1, (float)a->c1, (float)a->b2, (float)a->c2, (float)a->step,
                 (float)a->eps, (float)a->decay);
    } else {
        double *gs[MAX_GRADS];
        for (int j = 0; j < a->k; j++) gs[j] = (double *)a->gs[j] + lo;
        adam_f64(gs, a->k, (double *)a->p + lo, (double *)a->m + lo, (double *)a->v + lo,
                 hi - lo, a->b1, a->c1, a->b2, a->c2, a->step, a->eps, a->decay);
    }
}

/* The kernels over the team. Each part computes its numbers exactly as the whole pass would:
 * - the flat kernels (the likelihood's terms and gradient, the ReLU mask) take a slice of the
 *   buffers;
 * - bias+ReLU and the likelihood's bias pass take whole rows [r0, r1);
 * - a sum over rows (a bias gradient) takes the columns [c0, c1) of every row, so that each
 *   column still adds its rows in order.
 * The kernels that compute a gradient and sum it over rows in one pass run, on more threads,
 * as a flat pass and then the sum (mat_run). Parts are cut at multiples of 16 rows or numbers
 * or columns. */
enum { OP_BIAS_RELU, OP_RELU_GRAD_BIAS, OP_BIAS_NEGABS, OP_NLL_GRAD_DB, OP_NLL_TERMS,
       OP_NLL_GRAD, OP_RELU_GRAD, OP_COL_SUM };

typedef struct {
    int op, f32;
    void *a[4], *vec;
    Py_ssize_t rows, cols;
    double scale;
} MatJob;

static int by_rows(int op) { return op == OP_BIAS_RELU || op == OP_BIAS_NEGABS; }

#define MAT_CASES(T, SUFFIX)                                                                   \
    switch (j->op) {                                                                           \
    case OP_BIAS_RELU:                                                                         \
        bias_relu_##SUFFIX((T *)j->a[0] + r0 * j->cols, (T *)j->vec, r1 - r0, j->cols,         \
                           j->cols);                                                           \
        break;                                                                                 \
    case OP_BIAS_NEGABS:                                                                       \
        bias_negabs_##SUFFIX((T *)j->a[0] + r0 * j->cols, (T *)j->vec,                         \
                             (T *)j->a[1] + r0 * j->cols, r1 - r0, j->cols, j->cols);          \
        break;                                                                                 \
    case OP_RELU_GRAD_BIAS:                                                                    \
        relu_grad_bias_##SUFFIX((T *)j->a[0] + c0, (T *)j->a[1] + c0, (T *)j->a[2] + c0,       \
                                (T *)j->vec + c0, j->rows, c1 - c0, j->cols);                  \
        break;                                                                                 \
    case OP_NLL_GRAD_DB:                                                                       \
        nll_grad_db_##SUFFIX((T *)j->a[0] + c0, (T *)j->a[1] + c0, (T *)j->a[2] + c0,          \
                             (T *)j->a[3] + c0, (T *)j->vec + c0, j->rows, c1 - c0, j->cols,   \
                             (T)j->scale);                                                     \
        break;                                                                                 \
    case OP_NLL_TERMS:                                                                         \
        nll_terms_##SUFFIX((T *)j->a[0] + c0, (T *)j->a[1] + c0, (T *)j->a[2] + c0, c1 - c0);  \
        break;                                                                                 \
    case OP_NLL_GRAD:                                                                          \
        nll_grad_##SUFFIX((T *)j->a[0] + c0, (T *)j->a[1] + c0, (T *)j->a[2] + c0,             \
                          (T *)j->a[3] + c0, c1 - c0, (T)j->scale);                            \
        break;                                                                                 \
    case OP_RELU_GRAD:                                                                         \
        relu_grad_##SUFFIX((T *)j->a[0] + c0, (T *)j->a[1] + c0, (T *)j->a[2] + c0, c1 - c0);  \
        break;                                                                                 \
    case OP_COL_SUM:                                                                           \
        col_sum_##SUFFIX((T *)j->a[0] + c0, (T *)j->vec + c0, j->rows, c1 - c0, j->cols);      \
        break;                                                                                 \
    }

static void mat_part(void *arg, int part, int parts)
{
    MatJob *j = arg;
    Py_ssize_t r0 = 0, r1 = j->rows, c0 = 0, c1 = j->cols;  /* flat kernels: rows = 1 */
    if (by_rows(j->op))
        part_range(j->rows, part, parts, &r0, &r1);
    else
        part_range(j->cols, part, parts, &c0, &c1);
    if (r1 <= r0 || c1 <= c0) return;
    if (j->f32) {
        MAT_CASES(float, f32)
    } else {
        MAT_CASES(double, f64)
    }
}

/* Run a job on `threads` parts at most: each at least 16 rows or columns wide and MIN_PART
 * numbers. */
static void mat_run_one(MatJob *j, int threads)
{
    Py_ssize_t n = j->rows * j->cols;
    Py_ssize_t cut = by_rows(j->op) ? j->rows : j->cols;
    if (cut < (Py_ssize_t)threads * 16) threads = (int)(cut / 16);
    if (n < (Py_ssize_t)threads * MIN_PART) threads = (int)(n / MIN_PART);
    team_run(mat_part, j, threads);
}

/* A kernel that sums its gradient over rows (relu_grad_bias, nll_grad_db) runs, on more than
 * one thread, as two team jobs: the elementwise pass cut into flat slices, then the sum over
 * rows cut by columns. The numbers are those of the one pass: each element is the same
 * product or quotient, stored, then added down its column in row order. Cutting the one pass
 * by columns instead gained nothing at batch 128 (each core then streams half of every row);
 * two jobs pay from MIN_PART numbers a part for the likelihood's gradient (its division;
 * batch 128, 784 columns, 2 threads: 54 -> 47 us; batch 512: 317 -> 177 us) and from twice
 * that for the ReLU mask (512 x 400: 98 -> 65 us; 128 x 784: 38 -> 40 us, so one pass). */
static void mat_run(MatJob *j, int threads)
{
    Py_ssize_t n = j->rows * j->cols;
    if (j->op != OP_RELU_GRAD_BIAS && j->op != OP_NLL_GRAD_DB) {
        mat_run_one(j, threads);
        return;
    }
    Py_ssize_t min_part = j->op == OP_NLL_GRAD_DB ? MIN_PART : 2 * (Py_ssize_t)MIN_PART;
    if (threads < 2 || n < 2 * min_part) {
        mat_part(j, 0, 1);
        return;
    }
    if (n < (Py_ssize_t)threads * min_part) threads = (int)(n / min_part);
    MatJob flat = *j, sum = *j;
    flat.rows = 1;
    flat.cols = n;
    flat.vec = NULL;
    if (j->op == OP_NLL_GRAD_DB) {
        flat.op = OP_NLL_GRAD;            /* l, x, e -> out */
        sum.a[0] = j->a[3];
    } else {
        flat.op = OP_RELU_GRAD;           /* src, c -> g */
        sum.a[0] = j->a[2];
    }
    sum.op = OP_COL_SUM;
    mat_run_one(&flat, threads);
    mat_run_one(&sum, threads);
}

/* ----------------------------------------------------------------------------------------- */
/* The Bernoulli likelihood's forward on the team, rows by rows (numpy_twins.bernoulli_nll and
 * bernoulli_nll_bias): for each block of rows, while it is in L1,
 *     l <- l + b (with a bias);  e <- -|l|;  e <- exp(e);  t <- log1p(e);
 *     t <- (t + (|l| + l) / 2) - x l;  nll[i] <- sum_j t[i, j]
 * with NumPy's exp, log1p and add loops (numpy_loops above): the numbers of the NumPy calls. */
#define NLL_BLOCK 2048       /* numbers a block (rows of it): l, x, e and t stay in L1 */
#define MIN_NLL_PART 8192    /* numbers a part at least: exp and log1p cost ~1 ns a number */
typedef struct {
    int f32;
    char *l, *x, *e, *t, *nll;
    const char *b;
    Py_ssize_t rows, cols;
} NllJob;

static void nll_rows_part(void *arg, int part, int parts)
{
    NllJob *j = arg;
    Py_ssize_t r0, r1;
    part_range(j->rows, part, parts, &r0, &r1);
    int k = j->f32 ? 0 : 1;
    Py_ssize_t sz = j->f32 ? 4 : 8, cols = j->cols;
    if (cols == 0) {                  /* no pixels: each row's sum is 0, as np.sum gives */
        for (Py_ssize_t r = r0; r < r1; r++) {
            if (j->f32) ((float *)j->nll)[r] = 0.0f;
            else ((double *)j->nll)[r] = 0.0;
        }
        return;
    }
    Py_ssize_t block = cols >= NLL_BLOCK ? 1 : NLL_BLOCK / cols;
    for (Py_ssize_t r = r0; r < r1; r += block) {
        Py_ssize_t nr = r1 - r < block ? r1 - r : block, n = nr * cols, off = r * cols * sz;
        char *l = j->l + off, *x = j->x + off, *e = j->e + off, *t = j->t + off;
        if (j->f32) {
            if (j->b) bias_negabs_f32((float *)l, (const float *)j->b, (float *)e, nr, cols, cols);
            else negabs_f32((const float *)l, (float *)e, n);
        } else {
            if (j->b) bias_negabs_f64((double *)l, (const double *)j->b, (double *)e, nr, cols, cols);
            else negabs_f64((const double *)l, (double *)e, n);
        }
        char *ee[2] = {e, e}, *et[2] = {e, t};
        Py_ssize_t steps[3] = {sz, sz, sz};
        np_exp[k].fn(ee, &n, steps, np_exp[k].data);
        np_log1p[k].fn(et, &n, steps, np_log1p[k].data);
        if (j->f32) nll_terms_f32((const float *)l, (const float *)x, (float *)t, n);
        else nll_terms_f64((const double *)l, (const double *)x, (double *)t, n);
        Py_ssize_t reduce_steps[3] = {0, sz, 0};
        for (Py_ssize_t i = 0; i < nr; i++) {
            char *o = j->nll + (r + i) * sz, *row = t + i * cols * sz;
            char *args[3] = {o, row, o};
            if (j->f32) *(float *)o = 0.0f;
            else *(double *)o = 0.0;
            np_add[k].fn(args, &cols, reduce_steps, np_add[k].data);
        }
    }
}

/* The forward on `threads` parts at most: each at least 16 rows and MIN_NLL_PART numbers. */
static void nll_rows_run(NllJob *job, int threads)
{
    Py_ssize_t n = job->rows * job->cols;
    if (job->rows < (Py_ssize_t)threads * 16) threads = (int)(job->rows / 16);
    if (n < (Py_ssize_t)threads * MIN_NLL_PART) threads = (int)(n / MIN_NLL_PART);
    team_run(nll_rows_part, job, threads);
}

/* ----------------------------------------------------------------------------------------- */
/* Buffers: acquire, check, release. */
typedef struct {
    Py_buffer views[MAX_GRADS + 3];
    int held;
    const char *first_name; /* what the first buffer is, for error messages */
} Views;

static void release_all(Views *vs)
{
    for (int i = 0; i < vs->held; i++) PyBuffer_Release(&vs->views[i]);
    vs->held = 0;
}

/* Acquire obj as a C-contiguous, one-dimensional buffer (writable if asked) of n numbers, or,
 * with n < 0, of the first acquired buffer's length; check its type against the first one.
 * Returns its data pointer, or NULL with an exception set. */
static void *acquire_n(Views *vs, PyObject *obj, const char *what, int writable, Py_ssize_t n)
{
    Py_buffer *view = &vs->views[vs->held];
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) < 0)
        return NULL;
    vs->held++;
    const char *fmt = view->format ? view->format : "B";
    if (fmt[0] == '=' || fmt[0] == '<' || fmt[0] == '@') fmt++;
    if (view->ndim != 1 || !(strcmp(fmt, "f") == 0 || strcmp(fmt, "d") == 0)) {
        PyErr_Format(PyExc_TypeError, "%s must be a one-dimensional float32 or float64 array",
                     what);
        return NULL;
    }
    Py_buffer *first = &vs->views[0];
    if (view->itemsize != first->itemsize) {
        PyErr_Format(PyExc_TypeError, "%s has a different dtype from %s", what, vs->first_name);
        return NULL;
    }
    Py_ssize_t len = view->len / view->itemsize;   /* no n * itemsize: it could overflow */
    if (n < 0 && len != first->len / first->itemsize) {
        PyErr_Format(PyExc_ValueError, "%s has %zd numbers, %s %zd", what, len,
                     vs->first_name, first->len / first->itemsize);
        return NULL;
    }
    if (n >= 0 && len != n) {
        PyErr_Format(PyExc_ValueError, "%s has %zd numbers, not %zd", what, len, n);
        return NULL;
    }
    return view->buf;
}

static void *acquire(Views *vs, PyObject *obj, const char *what, int writable)
{
    return acquire_n(vs, obj, what, writable, -1);
}

/* The optimizers' shared tail: acquire the gradients gs_obj (1 to MAX_GRADS arrays) and the
 * nbufs state buffers bufs (p first; all writable, of one length and dtype) into job, run
 * fn(arg) (arg holds job; adam_part(job) for a plain update) on `threads` parts of the team,
 * release. -> 0, or -1 with an exception set before anything is written. */
static int run_optimizer(AdamJob *job, PyObject *gs_obj, PyObject **bufs,
                         const char **names, int nbufs, int threads, team_fn fn, void *arg)
{
    PyObject *gs_seq = PySequence_Fast(gs_obj, "gs must be a sequence of gradient arrays");
    if (gs_seq == NULL) return -1;
    Py_ssize_t k = PySequence_Fast_GET_SIZE(gs_seq);
    if (k < 1 || k > MAX_GRADS) {
        Py_DECREF(gs_seq);
        PyErr_Format(PyExc_ValueError, "gs holds %zd arrays; 1 to %d allowed", k, MAX_GRADS);
        return -1;
    }
    Views vs = {.held = 0, .first_name = "the gradient"};
    void *gs[MAX_GRADS], *state[3] = {NULL, NULL, NULL};
    int ok = 1;
    for (Py_ssize_t j = 0; j < k && ok; j++)
        ok = (gs[j] = acquire(&vs, PySequence_Fast_GET_ITEM(gs_seq, j), "a gradient", 1)) != NULL;
    for (int i = 0; i < nbufs && ok; i++)
        ok = (state[i] = acquire(&vs, bufs[i], names[i], 1)) != NULL;
    Py_DECREF(gs_seq);
    if (!ok) {
        release_all(&vs);
        return -1;
    }
    Py_ssize_t itemsize = vs.views[0].itemsize;
    job->gs = gs;
    job->k = (int)k;
    job->f32 = itemsize == 4;
    job->p = state[0];
    job->m = state[1];
    job->v = state[2];
    job->n = vs.views[0].len / itemsize;
    if (job->n < (Py_ssize_t)threads * MIN_PART) threads = (int)(job->n / MIN_PART);
    Py_BEGIN_ALLOW_THREADS
    team_run(fn, arg, threads);
    Py_END_ALLOW_THREADS
    release_all(&vs);
    return 0;
}

/* finite_code(a[, threads[, headroom]]) -> 0 if a number of the contiguous float32/float64
 * array a is NaN or Inf (its exponent bits all ones); else 2 if one is within 2^headroom of
 * overflowing (|x| >= 2^(emax + 1 - headroom)), so that a sum of 2^headroom such arrays could
 * overflow; else 1. Integer tests on the bits, which vectorize where a float reduction would
 * not without -ffast-math. The training step's check of the gradient before the optimizer
 * writes anything (minivae/engine/data_parallel.py). */
#include <stdint.h>
#ifndef MAX_TEAM
#define MAX_TEAM 0          /* no team on this platform: one part */
#endif
typedef struct {
    const void *a;
    Py_ssize_t n;
    int f32, headroom;
    int bad[MAX_TEAM + 1], big[MAX_TEAM + 1];
} FiniteJob;

/* scan_NAME(u, n, thr, &bad, &big): any biased exponent all ones (NaN/Inf), any >= thr */
#define DEFINE_SCAN(NAME, U, SHIFT, EMASK)                                                    \
    VECTOR_CLONES static void NAME(const U *restrict u, Py_ssize_t n, U thr, int *bad_out,    \
                                   int *big_out)                                              \
    {                                                                                         \
        U bad = 0, big = 0;                                                                   \
        for (Py_ssize_t i = 0; i < n; i++) {                                                  \
            U e = (u[i] >> SHIFT) & EMASK;                                                    \
            bad |= e == EMASK;                                                                \
            big |= e >= thr;                                                                  \
        }                                                                                     \
        *bad_out = bad != 0;                                                                  \
        *big_out = big != 0;                                                                  \
    }

DEFINE_SCAN(scan_f32, uint32_t, 23, 0xffu)
DEFINE_SCAN(scan_f64, uint64_t, 52, 0x7ffu)

/* headroom 0: only NaN/Inf to find, one reduction (2.5x faster than scan_* measured) */
#define DEFINE_NONFINITE(NAME, U, BITS)                                                    \
    VECTOR_CLONES static int NAME(const U *restrict u, Py_ssize_t n)                          \
    {                                                                                         \
        U bad = 0;                                                                            \
        for (Py_ssize_t i = 0; i < n; i++) bad |= ~u[i] & BITS ? 0u : 1u;                    \
        return bad != 0;                                                                      \
    }

DEFINE_NONFINITE(nonfinite_f32, uint32_t, 0x7f800000u)
DEFINE_NONFINITE(nonfinite_f64, uint64_t, 0x7ff0000000000000ull)

static void finite_part(void *arg, int part, int parts)
{
    FiniteJob *j = arg;
    Py_ssize_t lo, hi;
    part_range(j->n, part, parts, &lo, &hi);
    if (hi <= lo) return;
    if (j->headroom == 0) {
        j->bad[part] = j->f32 ? nonfinite_f32((const uint32_t *)j->a + lo, hi - lo)
                              : nonfinite_f64((const uint64_t *)j->a + lo, hi - lo);
        return;
    }
    /* biased exponent of 2^(emax + 1 - headroom): emax + 1 + bias - headroom = 255 or 2047
     * minus headroom */
    if (j->f32)
        scan_f32((const uint32_t *)j->a + lo, hi - lo, 255u - (uint32_t)j->headroom,
                 &j->bad[part], &j->big[part]);
    else
        scan_f64((const uint64_t *)j->a + lo, hi - lo, 2047u - (uint64_t)j->headroom,
                 &j->bad[part], &j->big[part]);
}

static PyObject *finite_code(PyObject *self, PyObject *args)
{
    PyObject *obj;
    int threads = 1, headroom = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "O|ii:finite_code", &obj, &threads, &headroom)) return NULL;
    if (headroom < 0 || headroom > 64)
        return PyErr_Format(PyExc_ValueError, "headroom must be 0 to 64, got %d", headroom);
    Views vs = {.held = 0, .first_name = "the array"};
    FiniteJob job;
    if ((job.a = acquire(&vs, obj, "the array", 0)) == NULL) {
        release_all(&vs);
        return NULL;
    }
    job.f32 = vs.views[0].itemsize == 4;
    job.n = vs.views[0].len / vs.views[0].itemsize;
    job.headroom = headroom;
    if (threads > MAX_TEAM + 1) threads = MAX_TEAM + 1;
    if (job.n < (Py_ssize_t)threads * MIN_PART) threads = (int)(job.n / MIN_PART);
    if (threads < 1) threads = 1;
    for (int i = 0; i < threads; i++) job.bad[i] = job.big[i] = 0;
    Py_BEGIN_ALLOW_THREADS
    team_run(finite_part, &job, threads);
    Py_END_ALLOW_THREADS
    release_all(&vs);
    int bad = 0, big = 0;
    for (int i = 0; i < threads; i++) {
        bad |= job.bad[i];
        big |= job.big[i];
    }
    return PyLong_FromLong(bad ? 0 : big ? 2 : 1);
}

/* adam_checked: the training step's gradient check (finite_code above, headroom 0) and Adam
 * over the whole flat buffer in one team job. Each part checks its slice of g, all parts wait
 * for all (they run at once: team_post), and then, only where no part found a NaN or an
 * infinity, each updates the slice it checked, which is still in its core's cache. The
 * numbers are those of finite_code followed by adam: the same slices, the same update. */
typedef struct {
    AdamJob adam;
    int bad[MAX_TEAM + 1];
    int arrived;
} CheckedAdamJob;

static void adam_checked_part(void *arg, int part, int parts)
{
    CheckedAdamJob *c = arg;
    Py_ssize_t lo, hi;
    part_range(c->adam.n, part, parts, &lo, &hi);
    int bad = 0;
    if (hi > lo)
        bad = c->adam.f32 ? nonfinite_f32((const uint32_t *)c->adam.gs[0] + lo, hi - lo)
                          : nonfinite_f64((const uint64_t *)c->adam.gs[0] + lo, hi - lo);
    c->bad[part] = bad;
    __atomic_fetch_add(&c->arrived, 1, __ATOMIC_ACQ_REL);
    while (__atomic_load_n(&c->arrived, __ATOMIC_ACQUIRE) < parts) sched_yield();
    for (int i = 0; i < parts; i++)
        if (c->bad[i]) return;
    adam_part(&c->adam, part, parts);
}

static PyObject *adam_checked(PyObject *self, PyObject *args)
{
    static const char *names[] = {"p", "m", "v"};
    PyObject *g_obj, *bufs[3];
    CheckedAdamJob job = {.adam = {.sgd = 0}, .arrived = 0};
    int threads = 1;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOOOddddddd|i:adam_checked", &g_obj, &bufs[0], &bufs[1],
                          &bufs[2], &job.adam.b1, &job.adam.c1, &job.adam.b2, &job.adam.c2,
                          &job.adam.step, &job.adam.eps, &job.adam.decay, &threads))
        return NULL;
    PyObject *gs = PyTuple_Pack(1, g_obj);     /* one gradient: the check reads gs[0] */
    if (gs == NULL) return NULL;
    for (int i = 0; i <= MAX_TEAM; i++) job.bad[i] = 0;
    int status = run_optimizer(&job.adam, gs, bufs, names, 3, threads, adam_checked_part, &job);
    Py_DECREF(gs);
    if (status < 0) return NULL;
    int bad = 0;
    for (int i = 0; i <= MAX_TEAM; i++) bad |= job.bad[i];
    return PyBool_FromLong(!bad);
}

static PyObject *adam(PyObject *self, PyObject *args)
{
    static const char *names[] = {"p", "m", "v"};
    PyObject *gs_obj, *bufs[3];
    AdamJob job = {.sgd = 0};
    int threads = 1;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOOOddddddd|i:adam", &gs_obj, &bufs[0], &bufs[1], &bufs[2],
                          &job.b1, &job.c1, &job.b2, &job.c2, &job.step, &job.eps, &job.decay,
                          &threads))
        return NULL;
    if (run_optimizer(&job, gs_obj, bufs, names, 3, threads, adam_part, &job) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *sgd_momentum(PyObject *self, PyObject *args)
{
    static const char *names[] = {"p", "the momentum buffer"};
    PyObject *gs_obj, *bufs[2];
    AdamJob job = {.sgd = 1};   /* b1: the momentum mu; step: the learning rate */
    int threads = 1;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOOdd|i:sgd_momentum", &gs_obj, &bufs[0], &bufs[1], &job.b1,
                          &job.step, &threads))
        return NULL;
    if (run_optimizer(&job, gs_obj, bufs, names, 2, threads, adam_part, &job) < 0) return NULL;
    Py_RETURN_NONE;
}

/* Acquire the n buffers objs[i] (named names[i], writable where writable[i]) into vs and
 * their data pointers into ptrs; on failure release them all. Returns 0, or -1 with an
 * exception set. */
static int acquire_all(Views *vs, PyObject **objs, const char **names, const int *writable,
                       int n, void **ptrs)
{
    vs->held = 0;
    vs->first_name = names[0];
    for (int i = 0; i < n; i++) {
        if ((ptrs[i] = acquire(vs, objs[i], names[i], writable[i])) == NULL) {
            release_all(vs);
            return -1;
        }
    }
    return 0;
}

/* Run a kernel's job without the GIL, then release its buffers: -> None. */
static PyObject *run_matrix_job(MatJob *job, int threads, Views *vs)
{
    Py_BEGIN_ALLOW_THREADS
    mat_run(job, threads);
    Py_END_ALLOW_THREADS
    release_all(vs);
    Py_RETURN_NONE;
}

static PyObject *bernoulli_nll_terms(PyObject *self, PyObject *args)
{
    static const char *names[] = {"the logits", "x", "t"};
    static const int writable[] = {0, 0, 1};
    PyObject *objs[3];
    void *a[3];
    Views vs;
    int threads = 1;
    if (!PyArg_ParseTuple(args, "OOO|i:bernoulli_nll_terms", &objs[0], &objs[1], &objs[2],
                          &threads) ||
        acquire_all(&vs, objs, names, writable, 3, a) < 0)
        return NULL;
    Py_ssize_t itemsize = vs.views[0].itemsize, n = vs.views[0].len / itemsize;
    MatJob job = {OP_NLL_TERMS, itemsize == 4, {a[0], a[1], a[2], NULL}, NULL, 1, n, 0.0};
    return run_matrix_job(&job, threads, &vs);
}

static PyObject *bernoulli_nll_grad(PyObject *self, PyObject *args)
{
    static const char *names[] = {"the logits", "x", "e", "out"};
    static const int writable[] = {0, 0, 0, 1};
    PyObject *objs[4];
    void *a[4];
    double scale;
    Views vs;
    int threads = 1;
    if (!PyArg_ParseTuple(args, "OOOOd|i:bernoulli_nll_grad", &objs[0], &objs[1], &objs[2],
                          &objs[3], &scale, &threads) ||
        acquire_all(&vs, objs, names, writable, 4, a) < 0)
        return NULL;
    Py_ssize_t itemsize = vs.views[0].itemsize, n = vs.views[0].len / itemsize;
    MatJob job = {OP_NLL_GRAD, itemsize == 4, {a[0], a[1], a[2], a[3]}, NULL, 1, n, scale};
    return run_matrix_job(&job, threads, &vs);
}

/* Whether a buffer holds exactly rows * cols numbers, without computing a product that could
 * overflow (a huge rows with the right cols would otherwise wrap round to the buffer's length
 * and let a kernel write past it). Sets ValueError naming `what` when it does not. */
static int check_shape(Py_buffer *view, const char *what, Py_ssize_t rows, Py_ssize_t cols)
{
    Py_ssize_t n = view->len / view->itemsize;
    int ok = (rows == 0 || cols == 0) ? n == 0 : (rows <= n / cols && rows * cols == n);
    if (!ok)
        PyErr_Format(PyExc_ValueError, "%s has %zd numbers, not rows x cols = %zd x %zd", what,
                     n, rows, cols);
    return ok;
}

/* The (rows, cols) kernels' arguments: n same-length buffers objs[i] (names[i], writable[i])
 * holding rows x cols numbers, then one vector of cols numbers (vec_name, vec_writable).
 * Pointers into ptrs and *vec; on failure everything is released and -1 returned with an
 * exception set, before anything is written. */
static int acquire_matrix(Views *vs, PyObject **objs, const char **names, const int *writable,
                          int n, void **ptrs, Py_ssize_t rows, Py_ssize_t cols,
                          PyObject *vec_obj, const char *vec_name, int vec_writable, void **vec)
{
    if (rows < 0 || cols < 0) {
        PyErr_Format(PyExc_ValueError, "rows and cols must be >= 0");
        return -1;
    }
    if (acquire_all(vs, objs, names, writable, n, ptrs) < 0)
        return -1;
    if (!check_shape(&vs->views[0], names[0], rows, cols) ||
        (*vec = acquire_n(vs, vec_obj, vec_name, vec_writable, cols)) == NULL) {
        release_all(vs);
        return -1;
    }
    return 0;
}

static PyObject *bias_relu(PyObject *self, PyObject *args)
{
    static const char *names[] = {"out"};
    static const int writable[] = {1};
    PyObject *objs[1], *b_obj;
    void *a[1], *b;
    Py_ssize_t rows, cols;
    Views vs;
    int threads = 1;
    if (!PyArg_ParseTuple(args, "OOnn|i:bias_relu", &objs[0], &b_obj, &rows, &cols, &threads) ||
        acquire_matrix(&vs, objs, names, writable, 1, a, rows, cols, b_obj, "b", 0, &b) < 0)
        return NULL;
    MatJob job = {OP_BIAS_RELU, vs.views[0].itemsize == 4, {a[0], NULL, NULL, NULL}, b, rows,
                  cols, 0.0};
    return run_matrix_job(&job, threads, &vs);
}

static PyObject *relu_grad_bias(PyObject *self, PyObject *args)
{
    static const char *names[] = {"src", "the ReLU output", "g"};
    static const int writable[] = {0, 0, 1};
    PyObject *objs[3], *db_obj;
    void *a[3], *db;
    Py_ssize_t rows, cols;
    Views vs;
    int threads = 1;
    if (!PyArg_ParseTuple(args, "OOOOnn|i:relu_grad_bias", &objs[0], &objs[1], &objs[2],
                          &db_obj, &rows, &cols, &threads) ||
        acquire_matrix(&vs, objs, names, writable, 3, a, rows, cols, db_obj, "db", 1, &db) < 0)
        return NULL;
    MatJob job = {OP_RELU_GRAD_BIAS, vs.views[0].itemsize == 4, {a[0], a[1], a[2], NULL}, db,
                  rows, cols, 0.0};
    return run_matrix_job(&job, threads, &vs);
}

static PyObject *bernoulli_bias_negabs(PyObject *self, PyObject *args)
{
    static const char *names[] = {"the logits array", "e"};
    static const int writable[] = {1, 1};
    PyObject *objs[2], *b_obj;
    void *a[2], *b;
    Py_ssize_t rows, cols;
    Views vs;
    int threads = 1;
    if (!PyArg_ParseTuple(args, "OOOnn|i:bernoulli_bias_negabs", &objs[0], &b_obj, &objs[1],
                          &rows, &cols, &threads) ||
        acquire_matrix(&vs, objs, names, writable, 2, a, rows, cols, b_obj, "b", 0, &b) < 0)
        return NULL;
    MatJob job = {OP_BIAS_NEGABS, vs.views[0].itemsize == 4, {a[0], a[1], NULL, NULL}, b, rows,
                  cols, 0.0};
    return run_matrix_job(&job, threads, &vs);
}

static PyObject *bernoulli_nll_grad_db(PyObject *self, PyObject *args)
{
    static const char *names[] = {"the logits array", "x", "e", "out"};
    static const int writable[] = {0, 0, 0, 1};
    PyObject *objs[4], *db_obj;
    void *a[4], *db;
    double scale;
    Py_ssize_t rows, cols;
    Views vs;
    int threads = 1;
    if (!PyArg_ParseTuple(args, "OOOOdOnn|i:bernoulli_nll_grad_db", &objs[0], &objs[1],
                          &objs[2], &objs[3], &scale, &db_obj, &rows, &cols, &threads) ||
        acquire_matrix(&vs, objs, names, writable, 4, a, rows, cols, db_obj, "db", 1, &db) < 0)
        return NULL;
    MatJob job = {OP_NLL_GRAD_DB, vs.views[0].itemsize == 4, {a[0], a[1], a[2], a[3]}, db,
                  rows, cols, scale};
    return run_matrix_job(&job, threads, &vs);
}


/* ----------------------------------------------------------------------------------------- */
/* The Gaussian latent of a VAE in one call each way (minivae/sampling.py: sample and
 * sample_backward; minivae/losses.py: kl_normal and kl_normal_backward), on the encoder's
 * output h = [mu | logvar] (B, 2L), eps (B, L), with NumPy's exp and add loops:
 *     sigma = exp(logvar * 0.5);  var = exp(logvar);  z = mu + sigma * eps
 *     kl[i] = 0.5 * sum_j (((mu * mu + var) - 1) - logvar)            (np.sum over a row)
 * and, with dz = dL/dz (B, L) and s = beta / n,
 *     dh[:, :L] = dz + mu * s                                    (sampler + KL, mu)
 *     dh[:, L:] = ((dz * sigma) * eps) * 0.5 + (0.5 * (var - 1)) * s   (logvar)
 * operation for operation as the NumPy expressions (each rounded once, left to right). A few
 * thousand numbers: one thread, and the gain is the ~20 NumPy calls it replaces. */
#define DEFINE_LATENT(SUFFIX, T)                                                          \
    static void latent_pre_##SUFFIX(const T *h, T *sigma, T *var, Py_ssize_t B,           \
                                    Py_ssize_t L)                                         \
    {                                                                                     \
        for (Py_ssize_t i = 0; i < B; i++)                                                \
            for (Py_ssize_t j = 0; j < L; j++) {                                          \
                T lv = h[i * 2 * L + L + j];                                              \
                sigma[i * L + j] = lv * (T)0.5;                                           \
                var[i * L + j] = lv;                                                      \
            }                                                                             \
    }                                                                                     \
    static void latent_post_##SUFFIX(const T *h, const T *eps, const T *sigma,            \
                                     const T *var, T *z, T *kl, T *row, Py_ssize_t B,     \
                                     Py_ssize_t L, const NpLoop *add)                     \
    {                                                                                     \
        Py_ssize_t steps[3] = {0, sizeof(T), 0};                                          \
        for (Py_ssize_t i = 0; i < B; i++) {                                              \
            const T *mu = h + i * 2 * L, *lv = mu + L;                                    \
            for (Py_ssize_t j = 0; j < L; j++) {                                          \
                Py_ssize_t o = i * L + j;                                                 \
                z[o] = mu[j] + sigma[o] * eps[o];                                         \
                row[j] = ((mu[j] * mu[j] + var[o]) - (T)1) - lv[j];                       \
            }                                                                             \
            T sum = (T)0;                                                                 \
            char *args[3] = {(char *)&sum, (char *)row, (char *)&sum};                    \
            add->fn(args, &L, steps, add->data);                                          \
            kl[i] = (T)0.5 * sum;                                                         \
        }                                                                                 \
    }                                                                                     \
    static void latent_back_##SUFFIX(const T *dz, const T *h, const T *sigma,             \
                                     const T *eps, const T *var, T s, T *dh,              \
                                     Py_ssize_t B, Py_ssize_t L)                          \
    {                                                                                     \
        for (Py_ssize_t i = 0; i < B; i++) {                                              \
            const T *mu = h + i * 2 * L;                                                  \
            T *d = dh + i * 2 * L;                                                        \
            for (Py_ssize_t j = 0; j < L; j++) {                                          \
                Py_ssize_t o = i * L + j;                                                 \
                d[j] = dz[o] + mu[j] * s;                                                 \
                d[L + j] = ((dz[o] * sigma[o]) * eps[o]) * (T)0.5                         \
                           + ((T)0.5 * (var[o] - (T)1)) * s;                              \
            }                                                                             \
        }                                                                                 \
    }

DEFINE_LATENT(f32, float)
DEFINE_LATENT(f64, double)

/* The sampler and KL forward on h (B, 2L) and eps (B, L) into z, sigma, var (B, L) and kl (B,),
 * with `row` L numbers of scratch (no GIL needed). */
static void latent_forward(int f32, const void *h, const void *eps, void *z, void *sigma,
                           void *var, void *kl, void *row, Py_ssize_t B, Py_ssize_t L)
{
    int k = f32 ? 0 : 1;
    Py_ssize_t n = B * L, sz = f32 ? 4 : 8, steps[2] = {sz, sz};
    char *ss[2] = {sigma, sigma}, *vv[2] = {var, var};
    if (f32) latent_pre_f32(h, sigma, var, B, L);
    else latent_pre_f64(h, sigma, var, B, L);
    np_exp[k].fn(ss, &n, steps, np_exp[k].data);     /* sigma = exp(logvar * 0.5) */
    np_exp[k].fn(vv, &n, steps, np_exp[k].data);     /* var = exp(logvar) */
    if (f32) latent_post_f32(h, eps, sigma, var, z, kl, row, B, L, &np_add[0]);
    else latent_post_f64(h, eps, sigma, var, z, kl, row, B, L, &np_add[1]);
}

static PyObject *gaussian_latent(PyObject *self, PyObject *args)
{
    static const char *names[] = {"h", "eps", "z", "sigma", "var"};
    static const int writable[] = {0, 0, 1, 1, 1};
    PyObject *objs[5], *kl_obj;
    void *a[5], *kl;
    Py_ssize_t B, L;
    Views vs;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOOOOOnn:gaussian_latent", &objs[0], &objs[1], &objs[2],
                          &objs[3], &objs[4], &kl_obj, &B, &L))
        return NULL;
    if (!np_loops_found)
        return PyErr_Format(PyExc_RuntimeError, "NumPy's exp and add loops were not found "
                            "(numpy_loops)");
    if (B < 0 || L < 0 || (L > 0 && B > PY_SSIZE_T_MAX / 2 / L))
        return PyErr_Format(PyExc_ValueError, "B and L must be >= 0 (and B x 2L a size)");
    vs.held = 0;
    vs.first_name = names[0];
    int ok = (a[0] = acquire_n(&vs, objs[0], names[0], 0, B * 2 * L)) != NULL;
    for (int i = 1; i < 5 && ok; i++) ok = (a[i] = acquire_n(&vs, objs[i], names[i], writable[i], B * L)) != NULL;
    ok = ok && (kl = acquire_n(&vs, kl_obj, "kl", 1, B)) != NULL;
    if (!ok) {
        release_all(&vs);
        return NULL;
    }
    int f32 = vs.views[0].itemsize == 4;
    void *row = PyMem_RawMalloc(L > 0 ? (size_t)L * (f32 ? 4 : 8) : 1);
    if (row == NULL) {
        release_all(&vs);
        return PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS
    latent_forward(f32, a[0], a[1], a[2], a[3], a[4], kl, row, B, L);
    Py_END_ALLOW_THREADS
    PyMem_RawFree(row);
    release_all(&vs);
    Py_RETURN_NONE;
}

static PyObject *gaussian_latent_backward(PyObject *self, PyObject *args)
{
    static const char *names[] = {"dz", "h", "sigma", "eps", "var", "dh"};
    static const int writable[] = {0, 0, 0, 0, 0, 1};
    PyObject *objs[6];
    void *a[6];
    double s;
    Py_ssize_t B, L;
    Views vs;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOOOOdOnn:gaussian_latent_backward", &objs[0], &objs[1],
                          &objs[2], &objs[3], &objs[4], &s, &objs[5], &B, &L))
        return NULL;
    if (B < 0 || L < 0 || (L > 0 && B > PY_SSIZE_T_MAX / 2 / L))
        return PyErr_Format(PyExc_ValueError, "B and L must be >= 0 (and B x 2L a size)");
    vs.held = 0;
    vs.first_name = names[0];
    int ok = 1;
    for (int i = 0; i < 6 && ok; i++) {
        Py_ssize_t want = (i == 1 || i == 5) ? B * 2 * L : B * L;
        ok = (a[i] = acquire_n(&vs, objs[i], names[i], writable[i], want)) != NULL;
    }
    if (!ok) {
        release_all(&vs);
        return NULL;
    }
    if (vs.views[0].itemsize == 4)
        latent_back_f32(a[0], a[1], a[2], a[3], a[4], (float)s, a[5], B, L);
    else
        latent_back_f64(a[0], a[1], a[2], a[3], a[4], s, a[5], B, L);
    release_all(&vs);
    Py_RETURN_NONE;
}

static PyObject *bernoulli_nll_rows(PyObject *self, PyObject *args)
{
    static const char *names[] = {"the logits array", "x", "e", "t"};
    int writable[] = {1, 0, 1, 1};      /* the logits are written only with a bias */
    PyObject *objs[4], *b_obj, *nll_obj;
    void *a[4], *b = NULL, *nll;
    Py_ssize_t rows, cols;
    Views vs;
    int threads = 1;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOOOOOnn|i:bernoulli_nll_rows", &objs[0], &b_obj, &objs[1],
                          &objs[2], &objs[3], &nll_obj, &rows, &cols, &threads))
        return NULL;
    if (!np_loops_found)
        return PyErr_Format(PyExc_RuntimeError, "NumPy's exp, log1p and add loops were not "
                            "found (numpy_loops): call np.exp, np.log1p and np.sum instead");
    if (rows < 0 || cols < 0) return PyErr_Format(PyExc_ValueError, "rows and cols must be >= 0");
    writable[0] = b_obj != Py_None;
    if (acquire_all(&vs, objs, names, writable, 4, a) < 0) return NULL;
    if (!check_shape(&vs.views[0], names[0], rows, cols) ||
        (b_obj != Py_None && (b = acquire_n(&vs, b_obj, "b", 0, cols)) == NULL) ||
        (nll = acquire_n(&vs, nll_obj, "nll", 1, rows)) == NULL) {
        release_all(&vs);
        return NULL;
    }
    NllJob job = {vs.views[0].itemsize == 4, a[0], a[1], a[2], a[3], nll, b, rows, cols};
    Py_BEGIN_ALLOW_THREADS
    nll_rows_run(&job, threads);
    Py_END_ALLOW_THREADS
    release_all(&vs);
    Py_RETURN_NONE;
}

/* ----------------------------------------------------------------------------------------- */
/* The step plan's pass in one call (minivae/engine/plan.py: Plan.compiled, the twin of
 * Plan.run): the same matrix products, through the same cblas_?gemm NumPy's matmul calls with
 * the same arguments (numpy/_core/src/umath/matmul.c.src: matrix_matrix, row major, each
 * operand NoTrans where its rows are contiguous, else Trans), and the same kernels as the
 * Python functions above, in the same order on the same arrays: the same numbers to the bit.
 * What it saves is the Python between ~25 calls, which runs with cold caches after each
 * product (about 0.1-0.2 ms a step at batch 128, measured). The program is an int64 array,
 * PROG_WORDS words an operation; an address word is a pointer into an array the plan keeps,
 * or, when negative, -1 - a slot of the step's own arrays (x, eps, kl, recon, loss). */
#define PROG_WORDS 16
enum { PR_GEMM = 1, PR_BIAS_RELU, PR_BIAS_ADD, PR_COL_SUM, PR_RELU_GRAD_BIAS, PR_NLL_ROWS,
       PR_NLL_GRAD_DB, PR_LATENT, PR_LATENT_BACK, PR_COPY_T, PR_LOSS };
enum { SLOT_X, SLOT_EPS, SLOT_KL, SLOT_RECON, SLOT_LOSS, N_SLOTS };
enum { CBLAS_ROW_MAJOR = 101, CBLAS_NO_TRANS = 111, CBLAS_TRANS = 112 };

typedef void (*sgemm64_fn)(int, int, int, long long, long long, long long, float, const float *,
                           long long, const float *, long long, float, float *, long long);
typedef void (*dgemm64_fn)(int, int, int, long long, long long, long long, double,
                           const double *, long long, const double *, long long, double,
                           double *, long long);
typedef void (*sgemm32_fn)(int, int, int, int, int, int, float, const float *, int,
                           const float *, int, float, float *, int);
typedef void (*dgemm32_fn)(int, int, int, int, int, int, double, const double *, int,
                           const double *, int, double, double *, int);
static void *gemm_fns[2];   /* NumPy's cblas_sgemm and cblas_dgemm (plan_blas) */
static int gemm_ilp64;

static void gemm_call(int f32, const long long *w, void *const *slots)
{
#define ADDR(v) ((v) < 0 ? slots[-1 - (v)] : (void *)(Py_intptr_t)(v))
    int ta = (int)w[2], tb = (int)w[3];
    long long M = w[4], N = w[5], K = w[6], lda = w[8], ldb = w[10], ldc = w[12];
    void *A = ADDR(w[7]), *B = ADDR(w[9]), *C = ADDR(w[11]);
    if (gemm_ilp64) {
        if (f32) ((sgemm64_fn)gemm_fns[0])(CBLAS_ROW_MAJOR, ta, tb, M, N, K, 1.0f, A, lda, B, ldb,
                                           0.0f, C, ldc);
        else ((dgemm64_fn)gemm_fns[1])(CBLAS_ROW_MAJOR, ta, tb, M, N, K, 1.0, A, lda, B, ldb,
                                       0.0, C, ldc);
    } else {
        if (f32) ((sgemm32_fn)gemm_fns[0])(CBLAS_ROW_MAJOR, ta, tb, (int)M, (int)N, (int)K, 1.0f,
                                           A, (int)lda, B, (int)ldb, 0.0f, C, (int)ldc);
        else ((dgemm32_fn)gemm_fns[1])(CBLAS_ROW_MAJOR, ta, tb, (int)M, (int)N, (int)K, 1.0, A,
                                       (int)lda, B, (int)ldb, 0.0, C, (int)ldc);
    }
}

#define DEFINE_PROGRAM_PIECES(SUFFIX, T)                                                  \
    static void bias_add_##SUFFIX(T *out, const T *b, Py_ssize_t rows, Py_ssize_t cols)  \
    {                                                                                     \
        for (Py_ssize_t i = 0; i < rows; i++)                                             \
            for (Py_ssize_t j = 0; j < cols; j++) out[i * cols + j] += b[j];              \
    }                                                                                     \
    static void copy_t_##SUFFIX(T *dst, const T *src, Py_ssize_t rows, Py_ssize_t cols)  \
    {                                                                                     \
        for (Py_ssize_t i = 0; i < rows; i++)                                             \
            for (Py_ssize_t j = 0; j < cols; j++) dst[i * cols + j] = src[j * rows + i];  \
    }                                                                                     \
    static void loss_##SUFFIX(T *loss, const T *recon, const T *kl, T beta, Py_ssize_t n) \
    {                                                                                     \
        for (Py_ssize_t i = 0; i < n; i++) loss[i] = recon[i] + beta * kl[i];            \
    }

DEFINE_PROGRAM_PIECES(f32, float)
DEFINE_PROGRAM_PIECES(f64, double)

static void program_run(const long long *prog, Py_ssize_t n_ops, void *const *slots,
                        double inv_n, double s, double beta, int parts)
{
    for (Py_ssize_t i = 0; i < n_ops; i++) {
        const long long *w = prog + i * PROG_WORDS;
        int op = (int)w[0], f32 = (int)w[1];
        switch (op) {
        case PR_GEMM:
            gemm_call(f32, w, slots);
            break;
        case PR_BIAS_RELU: {          /* out, b, rows, cols */
            MatJob j = {OP_BIAS_RELU, f32, {ADDR(w[2]), NULL, NULL, NULL}, ADDR(w[3]), w[4], w[5],
                        0.0};
            mat_run(&j, parts);
            break;
        }
        case PR_BIAS_ADD:             /* out, b, rows, cols: out += b, as np.add */
            if (f32) bias_add_f32(ADDR(w[2]), ADDR(w[3]), w[4], w[5]);
            else bias_add_f64(ADDR(w[2]), ADDR(w[3]), w[4], w[5]);
            break;
        case PR_COL_SUM: {            /* G, db, rows, cols: db = np.sum(G, axis=0) */
            MatJob j = {OP_COL_SUM, f32, {ADDR(w[2]), NULL, NULL, NULL}, ADDR(w[3]), w[4], w[5],
                        0.0};
            mat_run(&j, parts);
            break;
        }
        case PR_RELU_GRAD_BIAS: {     /* src, out, g, db, rows, cols */
            MatJob j = {OP_RELU_GRAD_BIAS, f32, {ADDR(w[2]), ADDR(w[3]), ADDR(w[4]), NULL},
                        ADDR(w[5]), w[6], w[7], 0.0};
            mat_run(&j, parts);
            break;
        }
        case PR_NLL_ROWS: {           /* l, b, x, e, t, nll, rows, cols */
            NllJob j = {f32, ADDR(w[2]), ADDR(w[4]), ADDR(w[5]), ADDR(w[6]), ADDR(w[7]),
                        ADDR(w[3]), w[8], w[9]};
            nll_rows_run(&j, parts);
            break;
        }
        case PR_NLL_GRAD_DB: {        /* l, x, e, out, db, rows, cols; scale 1 / n */
            MatJob j = {OP_NLL_GRAD_DB, f32, {ADDR(w[2]), ADDR(w[3]), ADDR(w[4]), ADDR(w[5])},
                        ADDR(w[6]), w[7], w[8], inv_n};
            mat_run(&j, parts);
            break;
        }
        case PR_LATENT:               /* h, eps, z, sigma, var, kl, row, B, L */
            latent_forward(f32, ADDR(w[2]), ADDR(w[3]), ADDR(w[4]), ADDR(w[5]), ADDR(w[6]),
                           ADDR(w[7]), ADDR(w[8]), w[9], w[10]);
            break;
        case PR_LATENT_BACK:          /* dz, h, sigma, eps, var, dh, B, L; s = beta / n */
            if (f32) latent_back_f32(ADDR(w[2]), ADDR(w[3]), ADDR(w[4]), ADDR(w[5]), ADDR(w[6]),
                                     (float)s, ADDR(w[7]), w[8], w[9]);
            else latent_back_f64(ADDR(w[2]), ADDR(w[3]), ADDR(w[4]), ADDR(w[5]), ADDR(w[6]), s,
                                 ADDR(w[7]), w[8], w[9]);
            break;
        case PR_COPY_T:               /* dst (rows, cols) <- src (cols, rows) transposed */
            if (f32) copy_t_f32(ADDR(w[2]), ADDR(w[3]), w[4], w[5]);
            else copy_t_f64(ADDR(w[2]), ADDR(w[3]), w[4], w[5]);
            break;
        case PR_LOSS:                 /* loss, recon, kl, n: loss = recon + beta kl */
            if (f32) loss_f32(ADDR(w[2]), ADDR(w[3]), ADDR(w[4]), (float)beta, w[5]);
            else loss_f64(ADDR(w[2]), ADDR(w[3]), ADDR(w[4]), beta, w[5]);
            break;
        }
    }
#undef ADDR
}

/* plan_blas(sgemm, dgemm, ilp64): the addresses of NumPy's own cblas_sgemm and cblas_dgemm
 * (minivae/engine/blas.py), and whether their integers are 64-bit. */
static PyObject *plan_blas(PyObject *self, PyObject *args)
{
    unsigned long long sg, dg;
    int ilp64;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKp:plan_blas", &sg, &dg, &ilp64)) return NULL;
    if (sg == 0 || dg == 0) return PyErr_Format(PyExc_ValueError, "no gemm function");
    gemm_fns[0] = (void *)(Py_intptr_t)sg;
    gemm_fns[1] = (void *)(Py_intptr_t)dg;
    gemm_ilp64 = ilp64;
    Py_RETURN_NONE;
}

/* run_plan(program, sizes, x, eps, kl, recon, loss, inv_n, s, beta, parts): the program (an
 * (n, PROG_WORDS) int64 array) on the step's arrays, whose lengths and dtype are checked
 * against sizes (int64: itemsize, then the numbers of x, eps, kl, recon and loss; eps, kl and
 * loss may be None where sizes says 0) before anything runs. */
static PyObject *run_plan(PyObject *self, PyObject *args)
{
    static const char *names[N_SLOTS] = {"x", "eps", "kl", "recon", "loss"};
    PyObject *prog_obj, *sizes_obj, *objs[N_SLOTS];
    double inv_n, s, beta;
    int parts;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOOOOOOdddi:run_plan", &prog_obj, &sizes_obj, &objs[0],
                          &objs[1], &objs[2], &objs[3], &objs[4], &inv_n, &s, &beta, &parts))
        return NULL;
    if (gemm_fns[0] == NULL) return PyErr_Format(PyExc_RuntimeError, "plan_blas was not called");
    if (!np_loops_found)
        return PyErr_Format(PyExc_RuntimeError, "NumPy's exp, log1p and add loops were not found "
                            "(numpy_loops)");
    Py_buffer pv, sv;
    if (PyObject_GetBuffer(prog_obj, &pv, PyBUF_C_CONTIGUOUS) < 0) return NULL;
    if (PyObject_GetBuffer(sizes_obj, &sv, PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(&pv);
        return NULL;
    }
    Views vs = {.held = 0, .first_name = "x"};
    void *slots[N_SLOTS] = {NULL};
    const long long *sizes = sv.buf;
    int ok = pv.len % (PROG_WORDS * 8) == 0 && sv.len == 8 * (N_SLOTS + 1);
    if (!ok) PyErr_Format(PyExc_ValueError, "not a plan program");
    for (int i = 0; i < N_SLOTS && ok; i++) {
        if (sizes[1 + i] == 0 && objs[i] == Py_None) continue;
        ok = (slots[i] = acquire_n(&vs, objs[i], names[i], i >= SLOT_KL, sizes[1 + i])) != NULL;
        if (ok && vs.views[vs.held - 1].itemsize != sizes[0]) {
            PyErr_Format(PyExc_TypeError, "%s has the wrong dtype for this plan", names[i]);
            ok = 0;
        }
    }
    if (ok) {
        Py_BEGIN_ALLOW_THREADS
        program_run(pv.buf, pv.len / (PROG_WORDS * 8), slots, inv_n, s, beta,
                    parts < 1 ? 1 : parts);
        Py_END_ALLOW_THREADS
    }
    release_all(&vs);
    PyBuffer_Release(&sv);
    PyBuffer_Release(&pv);
    if (!ok) return NULL;
    Py_RETURN_NONE;
}

/* ----------------------------------------------------------------------------------------- */
/* The team, from Python. */
typedef void (*blas_setter)(void *callback);

static PyObject *team_blas(PyObject *self, PyObject *args)
{
    unsigned long long setter;
    int on;
    (void)self;
    if (!PyArg_ParseTuple(args, "Kp:team_blas", &setter, &on)) return NULL;
#if HAVE_TEAM
    if (setter == 0) return PyErr_Format(PyExc_ValueError, "no setter function");
    ((blas_setter)(Py_intptr_t)setter)(on ? (void *)blas_callback : NULL);
    Py_RETURN_TRUE;
#else
    (void)on;
    Py_RETURN_FALSE;
#endif
}

static PyObject *team_info(PyObject *self, PyObject *args)
{
    long long spin_us = -1;
    (void)self;
    if (!PyArg_ParseTuple(args, "|L:team_info", &spin_us)) return NULL;
#if HAVE_TEAM
    if (spin_us >= 0) {   /* at most MAX_SPIN_US (10 s): no overflow in ns or deadlines */
        long long ns = (spin_us > MAX_SPIN_US ? MAX_SPIN_US : spin_us) * 1000;
        __atomic_store_n(&team_spin_ns, ns, __ATOMIC_RELAXED);
    }
    return Py_BuildValue("{s:i,s:L}", "workers", team_workers, "spin_us",
                         __atomic_load_n(&team_spin_ns, __ATOMIC_RELAXED) / 1000);
#else
    return Py_BuildValue("{s:i,s:L}", "workers", 0, "spin_us", (long long)0);
#endif
}

static PyMethodDef methods[] = {
    {"team_blas", team_blas, METH_VARARGS,
     "team_blas(setter, on): pass the team's callback (on) or NULL to OpenBLAS's\n"
     "openblas_set_threads_callback_function, whose address is setter; -> False without a team."},
    {"team_info", team_info, METH_VARARGS,
     "team_info([spin_us]) -> {'workers': started, 'spin_us': awake time after a job}."},
    {"finite_code", finite_code, METH_VARARGS,
     "finite_code(a[, threads[, headroom]]) -> 0: a holds NaN or Inf; 2: finite, but a number\n"
     "is within 2^headroom of overflowing; 1: neither."},
    {"adam", adam, METH_VARARGS,
     "adam(gs, p, m, v, b1, c1, b2, c2, step, eps, decay[, threads]): gs[0] <- sum(gs); then\n"
     "m <- b1 m + c1 g;  v <- b2 v + c2 g^2;  p <- decay p - step m / (sqrt(v) + eps),\n"
     "in one pass over equal-length, contiguous float32 or float64 arrays."},
    {"adam_checked", adam_checked, METH_VARARGS,
     "adam_checked(g, p, m, v, b1, c1, b2, c2, step, eps, decay[, threads]) -> whether g holds\n"
     "no NaN or Inf, and then adam([g], ...) applied; nothing written otherwise."},
    {"sgd_momentum", sgd_momentum, METH_VARARGS,
     "sgd_momentum(gs, p, b, mu, lr[, threads]): gs[0] <- sum(gs); b <- mu b + g (0 where\n"
     "below the smallest normal number); p <- p - lr b."},
    {"bernoulli_nll_terms", bernoulli_nll_terms, METH_VARARGS,
     "bernoulli_nll_terms(l, x, t): t <- (t + (|l| + l) / 2) - x l, where t = log1p(exp(-|l|))."},
    {"bernoulli_nll_grad", bernoulli_nll_grad, METH_VARARGS,
     "bernoulli_nll_grad(l, x, e, out, scale): out <- (P (1 - x) - Q x) / (e + 1) * scale,\n"
     "(P, Q) = (1, e) where l >= 0, else (e, 1); e = exp(-|l|)."},
    {"bernoulli_bias_negabs", bernoulli_bias_negabs, METH_VARARGS,
     "bernoulli_bias_negabs(l, b, e, rows, cols): l[i, j] <- l[i, j] + b[j], e <- -|l|."},
    {"bernoulli_nll_grad_db", bernoulli_nll_grad_db, METH_VARARGS,
     "bernoulli_nll_grad_db(l, x, e, out, scale, db, rows, cols): out as bernoulli_nll_grad,\n"
     "and db[j] <- sum_i out[i, j] (rows in order)."},
    {"numpy_loops", numpy_loops, METH_VARARGS,
     "numpy_loops(np.exp, np.log1p, np.add) -> whether NumPy's float32 and float64 loops were\n"
     "found (and kept for bernoulli_nll_rows)."},
    {"bernoulli_nll_rows", bernoulli_nll_rows, METH_VARARGS,
     "bernoulli_nll_rows(l, b, x, e, t, nll, rows, cols[, threads]): l <- l + b (b None: no\n"
     "bias), e <- exp(-|l|), t <- softplus(l) - x l, nll[i] <- sum_j t[i, j], with NumPy's\n"
     "exp, log1p and add loops, rows by rows."},
    {"gaussian_latent", gaussian_latent, METH_VARARGS,
     "gaussian_latent(h, eps, z, sigma, var, kl, B, L): the sampler and the KL on h = [mu |\n"
     "logvar] (B, 2L): sigma = exp(logvar / 2), var = exp(logvar), z = mu + sigma eps,\n"
     "kl = (1/2) sum_L (mu^2 + var - 1 - logvar)."},
    {"gaussian_latent_backward", gaussian_latent_backward, METH_VARARGS,
     "gaussian_latent_backward(dz, h, sigma, eps, var, s, dh, B, L): dh = [dz + mu s |\n"
     "dz sigma eps / 2 + (var - 1) s / 2], s = beta / n."},
    {"plan_blas", plan_blas, METH_VARARGS,
     "plan_blas(sgemm, dgemm, ilp64): NumPy's cblas_sgemm and cblas_dgemm, for run_plan."},
    {"run_plan", run_plan, METH_VARARGS,
     "run_plan(program, sizes, x, eps, kl, recon, loss, inv_n, s, beta, parts): the step\n"
     "plan's pass in one call (minivae/engine/plan.py)."},
    {"bias_relu", bias_relu, METH_VARARGS,
     "bias_relu(out, b, rows, cols): out[i, j] <- max(out[i, j] + b[j], 0), in place."},
    {"relu_grad_bias", relu_grad_bias, METH_VARARGS,
     "relu_grad_bias(src, out, g, db, rows, cols): g[i, j] <- src[i, j] * [out[i, j] > 0],\n"
     "db[j] <- sum_i g[i, j] (rows in order); src may be g."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "minivae.engine._kernels",
                                    "One-pass CPU kernels for minivae's NumPy step.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__kernels(void)
{
#if HAVE_TEAM
    static int registered = 0;
    if (!registered && pthread_atfork(NULL, NULL, team_after_fork) == 0) registered = 1;
#endif
    return PyModule_Create(&module);
}
