/* Route MLX's CPU matrix products to a fast BLAS: OpenBLAS, or Intel's MKL where it is installed.
 *
 * On Linux the mlx[cpu] wheel links the netlib *reference* BLAS: single-threaded, unblocked,
 * about 2 GFLOP/s for sgemm on a laptop core. libmlx imports cblas_sgemm/dgemm/cgemm by their
 * standard names. This tiny library defines those names and forwards them to the OpenBLAS of
 * the scipy-openblas32 wheel (whose own symbols carry a scipy_ prefix, so they cannot stand in
 * directly), or, once mlxrunner_blas_use() has opened it, to MKL's runtime library (the `mkl`
 * wheel's libmkl_rt). mlxrunner loads this library with RTLD_GLOBAL before mlx.core loads libmlx,
 * and the dynamic linker then binds libmlx's imports here: the global scope is searched before
 * libmlx's own dependencies. Nothing in MLX changes; its results stay the same up to summation order.
 */
#include <dlfcn.h>
#include <stdint.h>

typedef int blasint;

int scipy_openblas_get_num_threads(void);
void scipy_openblas_set_num_threads(int);

/* Products of fewer multiply-adds than this run on one thread. OpenBLAS splits every product above 64^3
 * across its threads; for the many small ones of attention (BERT's scores: 288 products of 170 x 170 x 32
 * per layer) waking and joining the threads costs more than the work, and when the other cores are busy
 * it is catastrophic: 8.4 s against 76 ms for those scores on this 2-core VM with other processes running
 * (benchmarks/README.md). Only MLX's CPU stream calls BLAS, so switching the global count is safe. Splitting
 * a product over rows or columns does not change its sums, so the results are the same either way. */
#define SINGLE_THREAD_BELOW_MACS (1 << 22)

/* A matrix-vector product (one row or one column of output: every product of an LLM's decode step) is bound by
 * its matrix's bytes, not its multiply-adds, and both cores' memory streams help from about a megabyte of matrix on
 * (OpenBLAS's sgemv, 1,024 x 3,072 floats: 457 us on one thread, 262 on two). */
#define SINGLE_THREAD_BELOW_MATRIX_ELEMENTS (1 << 18)

static int one_thread(blasint m, blasint n, blasint k) {
  const int64_t products = (int64_t)m * n * k;
  if (m == 1 || n == 1) return products < SINGLE_THREAD_BELOW_MATRIX_ELEMENTS;
  return products < SINGLE_THREAD_BELOW_MACS;
}

/* MKL's entry points once mlxrunner_blas_use() found them (NULL: OpenBLAS serves). */
typedef void (*sgemm_fn)(int, int, int, blasint, blasint, blasint, float, const float*, blasint, const float*, blasint,
                         float, float*, blasint);
typedef void (*dgemm_fn)(int, int, int, blasint, blasint, blasint, double, const double*, blasint, const double*,
                         blasint, double, double*, blasint);
typedef void (*cgemm_fn)(int, int, int, blasint, blasint, blasint, const void*, const void*, blasint, const void*,
                         blasint, const void*, void*, blasint);
static sgemm_fn mkl_sgemm;
static dgemm_fn mkl_dgemm;
static cgemm_fn mkl_cgemm;
static int (*mkl_get_threads)(void);
static void (*mkl_set_threads)(int);
static const char* last_error = "";

/* The serving BLAS's thread count: OpenBLAS's, or MKL's (both process-wide). Exported for _core, whose CPU kernels
 * run one product per core themselves and hold the BLAS to one thread meanwhile. */
__attribute__((visibility("default"))) int mlxrunner_blas_get_num_threads(void) {
  return mkl_get_threads ? mkl_get_threads() : scipy_openblas_get_num_threads();
}

__attribute__((visibility("default"))) void mlxrunner_blas_set_num_threads(int threads) {
  if (mkl_set_threads) {
    mkl_set_threads(threads);
  } else {
    scipy_openblas_set_num_threads(threads);
  }
}

#define FORWARD_GEMM(name, T, scalar_t, as_gemv)                                                                       \
  void scipy_cblas_##name(int order, int ta, int tb, blasint m, blasint n, blasint k, scalar_t alpha, const T* a,      \
                          blasint lda, const T* b, blasint ldb, scalar_t beta, T* c, blasint ldc);                     \
  __attribute__((visibility("default"))) void cblas_##name(int order, int ta, int tb, blasint m, blasint n, blasint k, \
                                                           scalar_t alpha, const T* a, blasint lda, const T* b,        \
                                                           blasint ldb, scalar_t beta, T* c, blasint ldc) {            \
    int threads = one_thread(m, n, k) ? mlxrunner_blas_get_num_threads() : 1;                                          \
    if (threads > 1) mlxrunner_blas_set_num_threads(1);                                                                \
    if (mkl_##name) {                                                                                                  \
      mkl_##name(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);                                         \
    } else if (!as_gemv(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)) {                                \
      scipy_cblas_##name(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);                                 \
    }                                                                                                                  \
    if (threads > 1) mlxrunner_blas_set_num_threads(threads);                                                          \
  }

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };

void scipy_cblas_sgemv(int order, int trans, blasint m, blasint n, float alpha, const float* a, blasint lda,
                       const float* x, blasint incx, float beta, float* y, blasint incy);

/* OpenBLAS's sgemm with one row (or column) of output runs its matrix-matrix kernels at a third of its sgemv's speed
 * (1 x 1,024 x 3,072: 1,415 against 457 us on one thread), and a float32 LLM's decode step is all such products
 * (0.6B-shaped: 3.6 tokens a second). So those go to sgemv: the same product, row-major, op(a) and op(b) read
 * through their strides. Returns 0 where the product is not one (or not row-major: MLX's are). */
static int openblas_sgemm_as_gemv(int order, int ta, int tb, blasint m, blasint n, blasint k, float alpha,
                                  const float* a, blasint lda, const float* b, blasint ldb, float beta, float* c,
                                  blasint ldc) {
  if (order != ROW_MAJOR || k <= 0) return 0;
  if (m == 1) { /* c's one row = op(a)'s one row (x) times op(b): op(b)^T x */
    const blasint incx = ta == NO_TRANS ? 1 : lda;
    if (tb == NO_TRANS) { /* b is [k, n] */
      scipy_cblas_sgemv(ROW_MAJOR, TRANS, k, n, alpha, b, ldb, a, incx, beta, c, 1);
    } else { /* b is stored [n, k] */
      scipy_cblas_sgemv(ROW_MAJOR, NO_TRANS, n, k, alpha, b, ldb, a, incx, beta, c, 1);
    }
    return 1;
  }
  if (n == 1) { /* c's one column = op(a) times op(b)'s one column (x) */
    const blasint incx = tb == NO_TRANS ? ldb : 1;
    if (ta == NO_TRANS) { /* a is [m, k] */
      scipy_cblas_sgemv(ROW_MAJOR, NO_TRANS, m, k, alpha, a, lda, b, incx, beta, c, ldc);
    } else { /* a is stored [k, m] */
      scipy_cblas_sgemv(ROW_MAJOR, TRANS, k, m, alpha, a, lda, b, incx, beta, c, ldc);
    }
    return 1;
  }
  return 0;
}

/* What the double and complex products take instead (MLX's models do not run them): OpenBLAS's gemm always. */
static int keep_gemm(int order, ...) {
  (void)order;
  return 0;
}

FORWARD_GEMM(sgemm, float, float, openblas_sgemm_as_gemv)
FORWARD_GEMM(dgemm, double, double, keep_gemm)
/* Complex gemm passes alpha/beta by pointer. */
FORWARD_GEMM(cgemm, void, const void*, keep_gemm)

/* Serve the products from the BLAS library at `path` (MKL's libmkl_rt) from now on; called before mlx.core
 * computes anything. Returns 0, or -1 (OpenBLAS still serving) where the library or one of its entry points is
 * missing: mlxrunner_blas_error() then says why. */

__attribute__((visibility("default"))) int mlxrunner_blas_use(const char* path) {
  void* library = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (!library) {
    last_error = dlerror();
    return -1;
  }
  sgemm_fn sgemm = (sgemm_fn)dlsym(library, "cblas_sgemm");
  dgemm_fn dgemm = (dgemm_fn)dlsym(library, "cblas_dgemm");
  cgemm_fn cgemm = (cgemm_fn)dlsym(library, "cblas_cgemm");
  int (*get_threads)(void) = (int (*)(void))dlsym(library, "MKL_Get_Max_Threads");
  void (*set_threads)(int) = (void (*)(int))dlsym(library, "MKL_Set_Num_Threads");
  if (!sgemm || !dgemm || !cgemm || !get_threads || !set_threads) {
    last_error = "one of cblas_sgemm, cblas_dgemm, cblas_cgemm, MKL_Get_Max_Threads, MKL_Set_Num_Threads is missing";
    dlclose(library);
    return -1;
  }
  mkl_get_threads = get_threads;
  mkl_set_threads = set_threads;
  mkl_dgemm = dgemm;
  mkl_cgemm = cgemm;
  mkl_sgemm = sgemm;
  return 0;
}

__attribute__((visibility("default"))) const char* mlxrunner_blas_error(void) {
  return last_error;
}
