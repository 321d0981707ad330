/* Kernels of the CPU runtime's split VAE graphs (ort_snake.py) that NumPy runs in several passes.
 *
 * snake: the folded Snake activation of the Oobleck VAE in one pass over memory,
 *
 *   out = y + inv_beta[c] * sin(alpha[c] * y) ** 2,   y = x (+ residual, also written to `summed`)
 *
 * over float32 [B, C, T] C-contiguous tensors, per channel c. NumPy needs five passes over a chunk for this
 * (multiply, sin, multiply, multiply, add) and a sixth for the residual add; here every element is read
 * once and written once, and `sin` is glibc's vectorised libmvec variant (the AVX-512 or AVX2 one, picked
 * at load time by target_clones). Measured on the Intel Xeon (AMX) the README's Performance section names:
 * 0.69 ns per element against NumPy's 1.94 (2.8x); with the residual add 1.32 against 2.91.
 *
 * Why a kernel of our own: no library computes it fused at this speed (numexpr without Intel's VML calls the
 * scalar sinf per element: 11 ns per element here; numba would add LLVM and a JIT to the runtime). When the
 * build cannot vectorise sin (not glibc on x86-64, or another compiler), VECTORISED is False and the runtime
 * keeps its NumPy path, which is faster than a scalar sinf loop.
 *
 * interleave: the phases of the decoder's upsampling (two convolutions, ort_snake.Upsample) into the output
 * samples, in runs that stay in the cache (NumPy's strided copy: 1.3-3.7x the time at the decoder's shapes).
 *
 * reorder: NCHW <-> ONNX Runtime's NCHWc layout (channels in blocks of 8 or 16 innermost), in which its
 * convolutions run 1.2-1.8x faster here (ort_snake.py keeps the decoder's values in it between pieces).
 *
 * Built by setup.py as an optional extension: if it does not compile, the package installs without it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>

/* setup.py defines ACESTEP_SNAKE_SIMD with -ffast-math -fopenmp-simd: glibc's math.h then declares sinf's SIMD
 * variants (only under __FAST_MATH__), and `omp simd` lets GCC call them. */
#if defined(ACESTEP_SNAKE_SIMD) && defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && \
    defined(__FAST_MATH__) && defined(__GLIBC__)
#define SNAKE_VECTORISED 1
#define SNAKE_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SNAKE_VECTORISED 0
#define SNAKE_CLONES
#endif

/* One Snake element: y = x (+ res, written to sum), out = y + b * sin(a * y)^2. */
#define SNAKE_ELEMENT(i, a, b)                                   \
    do {                                                         \
        const float y_ = res != NULL ? x[i] + res[i] : x[i];     \
        const float s_ = sinf((a) * y_);                         \
        if (res != NULL) sum[i] = y_;                            \
        out[i] = y_ + (b) * (s_ * s_);                           \
    } while (0)

/* Blocked rows of `len` positions of `block` channels (the NCHWc layout [B, C/block, L, block]); `block` is a
 * constant where this is inlined, so the lane loop is one vector. */
static inline __attribute__((always_inline)) void snake_blocked(
        const float *x, const float *res, float *sum, float *out, Py_ssize_t rows, Py_ssize_t len,
        const float *alpha, const float *inv_beta, Py_ssize_t groups, const Py_ssize_t block) {
    for (Py_ssize_t r = 0; r < rows; r++) {
        const float *a = alpha + (r % groups) * block, *b = inv_beta + (r % groups) * block;
        for (Py_ssize_t q = r * len; q < (r + 1) * len; q++) {
            const Py_ssize_t base = q * block;
#pragma omp simd
            for (Py_ssize_t lane = 0; lane < block; lane++)
                SNAKE_ELEMENT(base + lane, a[lane], b[lane]);
        }
    }
}

/* x, res, sum, out: [B, C, L] (block 1: rows = B * C, row r is channel r % channels) or NCHWc
 * [B, C/block, L, block] (rows = B * C/block). `res`/`sum` NULL: no residual. `out` (and `sum`) may be the same
 * memory as `x` (element i is read before element i is written). */
SNAKE_CLONES
static void snake_rows(const float *x, const float *res, float *sum, float *out, Py_ssize_t rows,
                       Py_ssize_t len, const float *alpha, const float *inv_beta, Py_ssize_t channels,
                       Py_ssize_t block) {
    if (block == 16) {
        snake_blocked(x, res, sum, out, rows, len, alpha, inv_beta, channels / 16, 16);
        return;
    }
    if (block == 8) {
        snake_blocked(x, res, sum, out, rows, len, alpha, inv_beta, channels / 8, 8);
        return;
    }
    if (block > 1) {
        snake_blocked(x, res, sum, out, rows, len, alpha, inv_beta, channels / block, block);
        return;
    }
    for (Py_ssize_t r = 0; r < rows; r++) {
        const float a = alpha[r % channels], b = inv_beta[r % channels];
#pragma omp simd
        for (Py_ssize_t i = r * len; i < (r + 1) * len; i++)
            SNAKE_ELEMENT(i, a, b);
    }
}

/* A float32 C-contiguous buffer of `obj` (writable if asked); 0 and a Python error if it is not one. */
static int float_buffer(PyObject *obj, Py_buffer *view, int writable, const char *name) {
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) != 0) {
        PyErr_Format(PyExc_TypeError, "snake: %s must be a%s C-contiguous float32 array", name,
                     writable ? " writable" : "");
        return 0;
    }
    const char *f = view->format;
    if (view->itemsize != 4 || f == NULL || !(strcmp(f, "f") == 0 || strcmp(f, "<f") == 0 || strcmp(f, "=f") == 0)) {
        PyBuffer_Release(view);
        PyErr_Format(PyExc_TypeError, "snake: %s must be float32", name);
        return 0;
    }
    return 1;
}

/* Same memory, or none in common: element-wise aliasing is safe, a shifted overlap is not. */
static int disjoint_or_same(const Py_buffer *a, const Py_buffer *b) {
    const char *a0 = a->buf, *b0 = b->buf;
    return a0 == b0 || a0 + a->len <= b0 || b0 + b->len <= a0;
}

static PyObject *snake(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"x", "alpha", "inv_beta", "out", "residual", "summed", "block", NULL};
    PyObject *ox, *oalpha, *obeta, *oout, *ores = Py_None, *osum = Py_None;
    Py_ssize_t block = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOO|OOn:snake", keywords, &ox, &oalpha, &obeta, &oout,
                                     &ores, &osum, &block))
        return NULL;
    int with_res = ores != Py_None;
    if (with_res != (osum != Py_None)) {
        PyErr_SetString(PyExc_ValueError, "snake: residual and summed go together");
        return NULL;
    }
    Py_buffer x = {0}, alpha = {0}, beta = {0}, out = {0}, res = {0}, sum = {0};
    PyObject *result = NULL;
    if (!float_buffer(ox, &x, 0, "x")) goto done;
    if (!float_buffer(oalpha, &alpha, 0, "alpha")) goto done;
    if (!float_buffer(obeta, &beta, 0, "inv_beta")) goto done;
    if (!float_buffer(oout, &out, 1, "out")) goto done;
    if (with_res && (!float_buffer(ores, &res, 0, "residual") || !float_buffer(osum, &sum, 1, "summed")))
        goto done;
    if (!(x.ndim == 3 || (x.ndim == 4 && x.shape[2] == 1)) || block < 1 || x.shape[1] % block != 0) {
        PyErr_SetString(PyExc_ValueError, "snake: x must be [B, C, T] or [B, C, 1, T], C a multiple of block");
        goto done;
    }
    Py_ssize_t channels = x.shape[1], len = x.shape[x.ndim - 1], rows = x.shape[0] * (channels / block);
    if (alpha.len != channels * 4 || beta.len != channels * 4) {
        PyErr_SetString(PyExc_ValueError, "snake: alpha and inv_beta need one value per channel of x");
        goto done;
    }
    if (out.len != x.len || (with_res && (res.len != x.len || sum.len != x.len))) {
        PyErr_SetString(PyExc_ValueError, "snake: out, residual and summed must have x's size");
        goto done;
    }
    if (!disjoint_or_same(&x, &out) || (with_res && (!disjoint_or_same(&res, &out) ||
                                                     !disjoint_or_same(&x, &sum) || !disjoint_or_same(&sum, &out)))) {
        PyErr_SetString(PyExc_ValueError, "snake: out and summed may be x itself, not a shifted view of it");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS  /* windows of one decode run on several threads at once */
    snake_rows(x.buf, with_res ? res.buf : NULL, with_res ? sum.buf : NULL, out.buf, rows, len, alpha.buf,
               beta.buf, channels, block);
    Py_END_ALLOW_THREADS
    Py_INCREF(Py_None);
    result = Py_None;
done:
    if (x.obj) PyBuffer_Release(&x);
    if (alpha.obj) PyBuffer_Release(&alpha);
    if (beta.obj) PyBuffer_Release(&beta);
    if (out.obj) PyBuffer_Release(&out);
    if (res.obj) PyBuffer_Release(&res);
    if (sum.obj) PyBuffer_Release(&sum);
    return result;
}

/* The upsampling's phases into samples. a and b hold the phases j < h and j >= h (h = s / 2) stacked
 * phase-major: channel (j mod h) * Cout + c. Block 1: a, b [B, h * Cout, T], out [B, Cout, T * s];
 * out[., c, q * s + j] = phase j's [., c, q]. Block k (NCHWc): a, b [B, h * Cout / k, T, k], out
 * [B, Cout / k, T * s, k]; whole lanes of k channels move together. In runs of INTERLEAVE_RUN positions q,
 * so that the s phases of a run are written into the same lines of the cache. */
#define INTERLEAVE_RUN 1024
static void interleave_rows(const float *a, const float *b, float *out, Py_ssize_t batch, Py_ssize_t groups,
                            Py_ssize_t len, Py_ssize_t stride, Py_ssize_t block) {
    const Py_ssize_t half = stride / 2;
    for (Py_ssize_t n = 0; n < batch; n++) {
        for (Py_ssize_t g = 0; g < groups; g++) {
            float *outr = out + (n * groups + g) * len * stride * block;
            for (Py_ssize_t q0 = 0; q0 < len; q0 += INTERLEAVE_RUN) {
                const Py_ssize_t q1 = q0 + INTERLEAVE_RUN < len ? q0 + INTERLEAVE_RUN : len;
                for (Py_ssize_t j = 0; j < stride; j++) {
                    const float *src = (j < half ? a : b) + ((n * half + j % half) * groups + g) * len * block;
                    if (block == 1) {
                        for (Py_ssize_t q = q0; q < q1; q++)
                            outr[q * stride + j] = src[q];
                    } else {
                        for (Py_ssize_t q = q0; q < q1; q++)
                            memcpy(outr + (q * stride + j) * block, src + q * block, block * sizeof(float));
                    }
                }
            }
        }
    }
}

static PyObject *interleave(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"a", "b", "out", "stride", "block", NULL};
    PyObject *oa, *ob, *oout;
    Py_ssize_t stride, block = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOn|n:interleave", keywords, &oa, &ob, &oout, &stride, &block))
        return NULL;
    Py_buffer a = {0}, b = {0}, out = {0};
    PyObject *result = NULL;
    if (!float_buffer(oa, &a, 0, "a") || !float_buffer(ob, &b, 0, "b") || !float_buffer(oout, &out, 1, "out"))
        goto done;
    int dims = block == 1 ? 3 : 4;  /* blocked values are ONNX Runtime's NCHWc [B, C, 1, T] */
    int ok = stride >= 2 && stride % 2 == 0 && block >= 1 && a.ndim == dims && b.ndim == dims && out.ndim == dims;
    Py_ssize_t len = ok ? a.shape[dims - 1] : 0;
    ok = ok && (dims == 3 || (a.shape[2] == 1 && b.shape[2] == 1 && out.shape[2] == 1));
    ok = ok && b.shape[0] == a.shape[0] && b.shape[1] == a.shape[1] && b.shape[dims - 1] == len &&
         out.shape[0] == a.shape[0] && a.shape[1] == out.shape[1] * (stride / 2) && out.shape[1] % block == 0 &&
         out.shape[dims - 1] == len * stride;
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "interleave: a, b [B, Cout * s/2, T] and out [B, Cout, T * s] (block > 1: "
                                          "[B, ., 1, .], Cout a multiple of block), s even");
        goto done;
    }
    if (!disjoint_or_same(&a, &out) || a.buf == out.buf || !disjoint_or_same(&b, &out) || b.buf == out.buf) {
        PyErr_SetString(PyExc_ValueError, "interleave: out must not overlap a or b");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    interleave_rows(a.buf, b.buf, out.buf, out.shape[0], out.shape[1] / block, len, stride, block);
    Py_END_ALLOW_THREADS
    Py_INCREF(Py_None);
    result = Py_None;
done:
    if (a.obj) PyBuffer_Release(&a);
    if (b.obj) PyBuffer_Release(&b);
    if (out.obj) PyBuffer_Release(&out);
    return result;
}

/* NCHW [B, C, T] <-> NCHWc [B, C / k, T, k] (to_blocked: x is NCHW). In runs of REORDER_RUN positions so
 * that the k rows read (or written) at once stay in the cache. */
#define REORDER_RUN 256
static void reorder_rows(const float *x, float *out, Py_ssize_t groups, Py_ssize_t len, Py_ssize_t block,
                         int to_blocked) {
    for (Py_ssize_t g = 0; g < groups; g++) {
        const float *xg = x + g * len * block;
        float *og = out + g * len * block;
        for (Py_ssize_t q0 = 0; q0 < len; q0 += REORDER_RUN) {
            const Py_ssize_t q1 = q0 + REORDER_RUN < len ? q0 + REORDER_RUN : len;
            for (Py_ssize_t lane = 0; lane < block; lane++)
                for (Py_ssize_t q = q0; q < q1; q++) {
                    if (to_blocked)
                        og[q * block + lane] = xg[lane * len + q];
                    else
                        og[lane * len + q] = xg[q * block + lane];
                }
        }
    }
}

static PyObject *reorder(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"x", "out", "block", "to_blocked", NULL};
    PyObject *ox, *oout;
    Py_ssize_t block;
    int to_blocked;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOnp:reorder", keywords, &ox, &oout, &block, &to_blocked))
        return NULL;
    Py_buffer x = {0}, out = {0};
    PyObject *result = NULL;
    if (!float_buffer(ox, &x, 0, "x") || !float_buffer(oout, &out, 1, "out"))
        goto done;
    const Py_buffer *nchw = to_blocked ? &x : &out, *blocked = to_blocked ? &out : &x;
    if (block < 2 || nchw->ndim != 3 || blocked->ndim != 4 || blocked->shape[2] != 1 || nchw->shape[1] % block ||
        blocked->shape[0] != nchw->shape[0] || blocked->shape[1] != nchw->shape[1] ||
        blocked->shape[3] != nchw->shape[2]) {
        PyErr_SetString(PyExc_ValueError, "reorder: NCHW [B, C, T] and NCHWc [B, C, 1, T], C a multiple of block");
        goto done;
    }
    if (!disjoint_or_same(&x, &out) || x.buf == out.buf) {
        PyErr_SetString(PyExc_ValueError, "reorder: out must not overlap x");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    reorder_rows(x.buf, out.buf, nchw->shape[0] * nchw->shape[1] / block, nchw->shape[2], block, to_blocked);
    Py_END_ALLOW_THREADS
    Py_INCREF(Py_None);
    result = Py_None;
done:
    if (x.obj) PyBuffer_Release(&x);
    if (out.obj) PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"snake", (PyCFunction)(void (*)(void))snake, METH_VARARGS | METH_KEYWORDS,
     "snake(x, alpha, inv_beta, out, residual=None, summed=None, block=1)\n\n"
     "out = y + inv_beta * sin(alpha * y) ** 2 per channel, y = x (+ residual, written to summed);\n"
     "float32 C-contiguous x [B, C, T] (block 1) or NCHWc [B, C, 1, T] (block k: memory [B, C/k, T, k]),\n"
     "alpha and inv_beta [C]. Releases the GIL."},
    {"interleave", (PyCFunction)(void (*)(void))interleave, METH_VARARGS | METH_KEYWORDS,
     "interleave(a, b, out, stride, block=1)\n\n"
     "The upsampling's phases (stacked phase-major: channel (j mod s/2) * Cout + c; a: j < s/2, b: the rest)\n"
     "into out[:, c, q * s + j]; float32 C-contiguous a, b [B, Cout * s/2, T], out [B, Cout, T * s], or NCHWc\n"
     "[B, ., 1, .] with block k. Releases the GIL."},
    {"reorder", (PyCFunction)(void (*)(void))reorder, METH_VARARGS | METH_KEYWORDS,
     "reorder(x, out, block, to_blocked)\n\n"
     "NCHW [B, C, T] <-> NCHWc [B, C, 1, T] (memory [B, C/block, T, block]). Releases the GIL."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_vae_kernels", NULL, -1, methods};

PyMODINIT_FUNC PyInit__vae_kernels(void) {
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddObject(m, "VECTORISED", PyBool_FromLong(SNAKE_VECTORISED)) != 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
