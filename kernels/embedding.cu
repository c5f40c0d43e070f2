// Token embedding lookup and its scatter-add backward, f32, u32 token ids.
//
// Math:
//   embedding_forward_f32:  out[n, c] = table[ids[n], c]                 (assigned)
//   embedding_backward_f32: dtable[ids[n], c] += dout[n, c]   for every n (accumulated;
//                           a token seen k times adds k rows)
// Shapes: out, dout [N, C]; table, dtable [V, C]; ids [N] (u32).
// Out-of-range ids (>= V): the forward writes a zero row, the backward skips
//   the row. The launcher checks ids on the host when it is given them there;
//   ids already on the device are not checked (that would need a copy back).
// Launch: one thread per (n, c) element, block = 256, grid = ceil(N * C / 256)
//   capped at 65536 with a grid-stride loop; consecutive threads walk c, so
//   rows are read and written coalesced.
// The backward uses atomicAdd (a repeated token's rows race): the order of the
//   additions into one dtable element is not fixed, so the result can differ
//   from run to run by f32 rounding. A sort-by-token deterministic variant is
//   for later.
// CPU twin: aha_tensor::cpu::embedding_forward / embedding_backward.

extern "C" __global__ void embedding_forward_f32(
    float* __restrict__ out,
    const float* __restrict__ table,
    const unsigned int* __restrict__ ids,
    unsigned long long n,
    unsigned int vocab,
    int c)
{
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long e = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += stride) {
        const unsigned long long t = e / (unsigned long long)c;
        const int k = (int)(e - t * (unsigned long long)c);
        const unsigned int id = ids[t];
        out[e] = id < vocab ? table[(size_t)id * c + k] : 0.0f;
    }
}

extern "C" __global__ void embedding_backward_f32(
    float* __restrict__ dtable,
    const float* __restrict__ dout,
    const unsigned int* __restrict__ ids,
    unsigned long long n,
    unsigned int vocab,
    int c)
{
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long e = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += stride) {
        const unsigned long long t = e / (unsigned long long)c;
        const int k = (int)(e - t * (unsigned long long)c);
        const unsigned int id = ids[t];
        if (id < vocab) {
            atomicAdd(dtable + (size_t)id * c + k, dout[e]);
        }
    }
}
