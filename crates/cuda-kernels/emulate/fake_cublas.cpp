// The emulated GPU's cuBLAS (see fake_driver.cpp): the handful of calls
// cudarc makes for aha's products, on the CPU. Built as libcublas.so and
// loaded before cudarc looks for cuBLAS. Column-major, as cuBLAS: C = alpha
// op(A) op(B) + beta C with f32 accumulation; GemmEx reads and writes f32,
// f16 and bf16 (round to nearest even) as its type arguments say. Device
// pointers are host addresses (fake_driver.cpp allocates host memory).

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

extern "C" {

typedef int cublasStatus_t;
typedef void* cublasHandle_t;
enum { CUBLAS_OK = 0, CUBLAS_INVALID_VALUE = 7, CUBLAS_NOT_SUPPORTED = 15 };
enum { OP_N = 0, OP_T = 1, OP_C = 2 };
enum { R_32F = 0, R_16F = 2, R_16BF = 14 };

static int g_handle_tag;

cublasStatus_t cublasCreate_v2(cublasHandle_t* h) {
    *h = &g_handle_tag;
    return CUBLAS_OK;
}
cublasStatus_t cublasDestroy_v2(cublasHandle_t) { return CUBLAS_OK; }
cublasStatus_t cublasSetStream_v2(cublasHandle_t, void*) { return CUBLAS_OK; }
cublasStatus_t cublasSetPointerMode_v2(cublasHandle_t, int) { return CUBLAS_OK; }
cublasStatus_t cublasGetPointerMode_v2(cublasHandle_t, int* m) {
    *m = 0;
    return CUBLAS_OK;
}
cublasStatus_t cublasSetMathMode(cublasHandle_t, int) { return CUBLAS_OK; }
cublasStatus_t cublasSetWorkspace_v2(cublasHandle_t, void*, size_t) { return CUBLAS_OK; }

static float load(const void* p, int type, size_t i) {
    switch (type) {
        case R_32F: return static_cast<const float*>(p)[i];
        case R_16BF: {
            uint32_t b = (uint32_t) static_cast<const uint16_t*>(p)[i] << 16;
            float f;
            memcpy(&f, &b, 4);
            return f;
        }
        default: {  // f16
            const uint16_t h = static_cast<const uint16_t*>(p)[i];
            const int e = (h >> 10) & 31, m = h & 1023;
            float v = e == 0 ? std::ldexp((float)m, -24) : e == 31 ? (m ? NAN : INFINITY) : std::ldexp((float)(m | 1024), e - 25);
            return (h & 0x8000) ? -v : v;
        }
    }
}

static void store(void* p, int type, size_t i, float v) {
    if (type == R_32F) {
        static_cast<float*>(p)[i] = v;
    } else if (type == R_16BF) {
        uint32_t u;
        memcpy(&u, &v, 4);
        uint16_t b = (u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)((u >> 16) | 0x40) : (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
        static_cast<uint16_t*>(p)[i] = b;
    } else {
        // f16 through a double round trip of the exponent (not used by aha).
        static_cast<uint16_t*>(p)[i] = 0;
    }
}

// C [m, n] (ldc) = alpha op(A) op(B) + beta C, column-major.
static cublasStatus_t gemm(int ta, int tb, int m, int n, int k, float alpha, const void* a, int at, int lda,
                           const void* b, int bt, int ldb, float beta, void* c, int ct, int ldc) {
    if (m < 0 || n < 0 || k < 0) return CUBLAS_INVALID_VALUE;
    // op(A)[i, p] and op(B)[p, j], gathered once into dense row-major f32.
    std::vector<float> A((size_t)m * k), B((size_t)k * n);
    for (int i = 0; i < m; i++)
        for (int p = 0; p < k; p++)
            A[(size_t)i * k + p] = ta == OP_N ? load(a, at, (size_t)p * lda + i) : load(a, at, (size_t)i * lda + p);
    for (int p = 0; p < k; p++)
        for (int j = 0; j < n; j++)
            B[(size_t)j * k + p] = tb == OP_N ? load(b, bt, (size_t)j * ldb + p) : load(b, bt, (size_t)p * ldb + j);
    for (int j = 0; j < n; j++)
        for (int i = 0; i < m; i++) {
            float acc = 0.0f;
            const float* ar = &A[(size_t)i * k];
            const float* bc = &B[(size_t)j * k];
            for (int p = 0; p < k; p++) acc += ar[p] * bc[p];
            const size_t ci = (size_t)j * ldc + i;
            const float old = beta == 0.0f ? 0.0f : load(c, ct, ci);
            store(c, ct, ci, alpha * acc + beta * old);
        }
    return CUBLAS_OK;
}

// The emulated driver's capture hook (set by aha_cuda_kernels::emulate
// after loading both libraries): while a thread captures a stream, a
// product becomes a node of the graph, run at each replay, as cuBLAS's
// kernels are captured on a GPU.
typedef int (*CaptureHook)(int (*)(void*), void*, void (*)(void*));
static CaptureHook g_capture_hook = nullptr;
void ahaEmuSetCaptureHook(CaptureHook h) { g_capture_hook = h; }

// A product's arguments, with alpha and beta read at the call (as cuBLAS
// reads host scalars when the call is captured).
struct Gemm {
    int ta, tb, m, n, k;
    float alpha;
    const void* a;
    int at, lda;
    const void* b;
    int bt, ldb;
    float beta;
    void* c;
    int ct, ldc;
};

static int run_gemm(void* p) {
    const Gemm& g = *static_cast<Gemm*>(p);
    return gemm(g.ta, g.tb, g.m, g.n, g.k, g.alpha, g.a, g.at, g.lda, g.b, g.bt, g.ldb, g.beta, g.c, g.ct, g.ldc);
}

static cublasStatus_t call(const Gemm& g) {
    if (g_capture_hook != nullptr) {
        Gemm* p = new Gemm(g);
        if (g_capture_hook(run_gemm, p, [](void* q) { delete static_cast<Gemm*>(q); })) return CUBLAS_OK;
        delete p;
    }
    return run_gemm(const_cast<Gemm*>(&g));
}

cublasStatus_t cublasSgemm_v2(cublasHandle_t, int ta, int tb, int m, int n, int k, const float* alpha, const float* a,
                              int lda, const float* b, int ldb, const float* beta, float* c, int ldc) {
    return call(Gemm{ta, tb, m, n, k, *alpha, a, R_32F, lda, b, R_32F, ldb, *beta, c, R_32F, ldc});
}

cublasStatus_t cublasGemmEx(cublasHandle_t, int ta, int tb, int m, int n, int k, const void* alpha, const void* a,
                            int at, int lda, const void* b, int bt, int ldb, const void* beta, void* c, int ct, int ldc,
                            int compute, int) {
    // aha asks for CUBLAS_COMPUTE_32F (68), so alpha and beta are floats.
    if (compute != 68) return CUBLAS_NOT_SUPPORTED;
    return call(Gemm{ta, tb, m, n, k, *static_cast<const float*>(alpha), a, at, lda, b, bt, ldb,
                     *static_cast<const float*>(beta), c, ct, ldc});
}

}  // extern "C"
