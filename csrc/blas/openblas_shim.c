/* Route MLX's CPU matrix products to OpenBLAS.
 *
 * On Linux the mlx[cpu] wheel links the netlib *reference* BLAS: single-threaded, unblocked,
 * about 2 GFLOP/s for sgemm on a laptop core. libmlx imports cblas_sgemm/dgemm/cgemm by their
 * standard names. This tiny library defines those names and forwards them to the OpenBLAS of
 * the scipy-openblas32 wheel (whose own symbols carry a scipy_ prefix, so they cannot stand in
 * directly). mlxrunner loads it with RTLD_GLOBAL before mlx.core loads libmlx, and the dynamic
 * linker then binds libmlx's imports here: the global scope is searched before libmlx's own
 * dependencies. Nothing in MLX changes; its results stay the same up to summation order.
 */
#include <stdint.h>

typedef int blasint;
enum { ROW_MAJOR = 101 };

int scipy_openblas_get_num_threads(void);
void scipy_openblas_set_num_threads(int);

/* Products of fewer multiply-adds than this run on one thread. OpenBLAS splits every product above 64^3
 * across its threads; for the many small ones of attention (BERT's scores: 288 products of 170 x 170 x 32
 * per layer) waking and joining the threads costs more than the work, and when the other cores are busy
 * it is catastrophic: 8.4 s against 76 ms for those scores on this 2-core VM with other processes running
 * (benchmarks/README.md). Only MLX's CPU stream calls BLAS, so switching the global count is safe. Splitting
 * a product over rows or columns does not change its sums, so the results are the same either way. */
#define SINGLE_THREAD_BELOW_MACS (1 << 22)

static int small_product(blasint m, blasint n, blasint k) {
  return (int64_t)m * n * k < SINGLE_THREAD_BELOW_MACS;
}

#define FORWARD_GEMM(name, T, scalar_t)                                                                                \
  void scipy_cblas_##name(int order, int ta, int tb, blasint m, blasint n, blasint k, scalar_t alpha, const T* a,      \
                          blasint lda, const T* b, blasint ldb, scalar_t beta, T* c, blasint ldc);                     \
  __attribute__((visibility("default"))) void cblas_##name(int order, int ta, int tb, blasint m, blasint n, blasint k, \
                                                           scalar_t alpha, const T* a, blasint lda, const T* b,        \
                                                           blasint ldb, scalar_t beta, T* c, blasint ldc) {            \
    int threads = small_product(m, n, k) ? scipy_openblas_get_num_threads() : 1;                                      \
    if (threads > 1) scipy_openblas_set_num_threads(1);                                                                \
    scipy_cblas_##name(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);                                   \
    if (threads > 1) scipy_openblas_set_num_threads(threads);                                                          \
  }

FORWARD_GEMM(sgemm, float, float)
FORWARD_GEMM(dgemm, double, double)
/* Complex gemm passes alpha/beta by pointer. */
FORWARD_GEMM(cgemm, void, const void*)

/* A marker so mlxrunner can check that the shim, not the reference BLAS, serves libmlx. */
__attribute__((visibility("default"))) int mlxrunner_openblas_shim(void) {
  return 1;
}
