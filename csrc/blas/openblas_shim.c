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

#define FORWARD_GEMM(name, T, scalar_t)                                                                                \
  void scipy_cblas_##name(int order, int ta, int tb, blasint m, blasint n, blasint k, scalar_t alpha, const T* a,      \
                          blasint lda, const T* b, blasint ldb, scalar_t beta, T* c, blasint ldc);                     \
  __attribute__((visibility("default"))) void cblas_##name(int order, int ta, int tb, blasint m, blasint n, blasint k, \
                                                           scalar_t alpha, const T* a, blasint lda, const T* b,        \
                                                           blasint ldb, scalar_t beta, T* c, blasint ldc) {            \
    scipy_cblas_##name(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);                                   \
  }

FORWARD_GEMM(sgemm, float, float)
FORWARD_GEMM(dgemm, double, double)
/* Complex gemm passes alpha/beta by pointer. */
FORWARD_GEMM(cgemm, void, const void*)

/* A marker so mlxrunner can check that the shim, not the reference BLAS, serves libmlx. */
__attribute__((visibility("default"))) int mlxrunner_openblas_shim(void) {
  return 1;
}
