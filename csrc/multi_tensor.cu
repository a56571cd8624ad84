// Multi-tensor copy and lerp for SFPO's snapshot / reposition: the CUDA C++
// backend and speed-of-light reference for the Triton kernels in
// sfpo_kernels/multi_tensor.py. Same semantics, same pointer table:
//
//   table (int64, device): a_addr[n] | b_addr[n] | numel[n] | chunk_tensor[c] | chunk_start[c]
//
// One thread block per chunk; a block streams elements
// [chunk_start, min(chunk_start + chunk, numel)) of tensor chunk_tensor[j].
// When both pointers and the chunk start are 16-byte aligned the block moves
// 16 bytes per thread per access (uint4); otherwise, and for the tail, one
// element per access. Addresses may point at pinned host memory (zero-copy
// offload): the kernel then streams over PCIe.
//
// Built by sfpo_kernels/_cuda_lib.py with plain nvcc into a shared library
// loaded through ctypes; no torch headers, so it builds anywhere nvcc runs.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>

namespace {

constexpr int kThreads = 256;
// Independent 16-byte loads in flight per thread: hides DRAM latency.
constexpr int kUnroll = 4;

thread_local char g_last_error[256] = "";

struct Table {
  const int64_t* a_addr;
  const int64_t* b_addr;
  const int64_t* numel;
  const int64_t* chunk_tensor;
  const int64_t* chunk_start;
};

__device__ __forceinline__ Table table_columns(const int64_t* data, int64_t n, int64_t c) {
  return Table{data, data + n, data + 2 * n, data + 3 * n, data + 3 * n + c};
}

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

// ----------------------------------------------------------------- copy
// Bit copy: the element type only matters through its size.
template <typename T>
__global__ void mt_copy_kernel(const int64_t* table, int64_t n, int64_t c, int64_t chunk, bool src_is_a) {
  const Table t = table_columns(table, n, c);
  const int64_t j = blockIdx.x;
  const int64_t i = t.chunk_tensor[j];
  const int64_t start = t.chunk_start[j];
  const int64_t stop = min(start + chunk, t.numel[i]);
  const T* src = reinterpret_cast<const T*>(src_is_a ? t.a_addr[i] : t.b_addr[i]);
  T* dst = reinterpret_cast<T*>(src_is_a ? t.b_addr[i] : t.a_addr[i]);

  int64_t k = start;
  constexpr int kVec = 16 / sizeof(T);
  if (aligned16(src + start) && aligned16(dst + start)) {
    const int64_t n_vec = (stop - start) / kVec;
    const uint4* vsrc = reinterpret_cast<const uint4*>(src + start);
    uint4* vdst = reinterpret_cast<uint4*>(dst + start);
    for (int64_t v = threadIdx.x; v < n_vec; v += kThreads * kUnroll) {
      uint4 r[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t idx = v + u * kThreads;
        if (idx < n_vec) r[u] = vsrc[idx];
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t idx = v + u * kThreads;
        if (idx < n_vec) vdst[idx] = r[u];
      }
    }
    k = start + n_vec * kVec;
  }
  for (int64_t e = k + threadIdx.x; e < stop; e += kThreads) dst[e] = src[e];
}

// ----------------------------------------------------------------- lerp
template <typename T> struct Compute { using type = float; };
template <> struct Compute<double> { using type = double; };

template <typename T> __device__ __forceinline__ typename Compute<T>::type widen(T x) { return static_cast<typename Compute<T>::type>(x); }
template <> __device__ __forceinline__ float widen<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float widen<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T narrow(typename Compute<T>::type x) { return static_cast<T>(x); }
template <> __device__ __forceinline__ __half narrow<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 narrow<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float fma_c(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double fma_c(double a, double b, double c) { return fma(a, b, c); }

// torch.lerp(t, s, w) as ATen evaluates it: two branches so that w == 0 gives
// t and w == 1 gives s exactly.
template <typename T>
__device__ __forceinline__ T lerp_one(T t_raw, T s_raw, typename Compute<T>::type w, typename Compute<T>::type coeff,
                                      bool small) {
  using C = typename Compute<T>::type;
  const C t = widen<T>(t_raw);
  const C s = widen<T>(s_raw);
  return narrow<T>(fma_c(coeff, s - t, small ? t : s));
}

template <typename T>
__global__ void mt_lerp_kernel(const int64_t* table, int64_t n, int64_t c, int64_t chunk, double weight) {
  using C = typename Compute<T>::type;
  const Table t = table_columns(table, n, c);
  const int64_t j = blockIdx.x;
  const int64_t i = t.chunk_tensor[j];
  const int64_t start = t.chunk_start[j];
  const int64_t stop = min(start + chunk, t.numel[i]);
  T* param = reinterpret_cast<T*>(t.a_addr[i]);
  const T* snap = reinterpret_cast<const T*>(t.b_addr[i]);
  const C w = static_cast<C>(weight);
  const bool small = w < C(0.5);
  const C coeff = small ? w : w - C(1);

  int64_t k = start;
  constexpr int kVec = 16 / sizeof(T);
  if (aligned16(param + start) && aligned16(snap + start)) {
    const int64_t n_vec = (stop - start) / kVec;
    uint4* vparam = reinterpret_cast<uint4*>(param + start);
    const uint4* vsnap = reinterpret_cast<const uint4*>(snap + start);
    for (int64_t v = threadIdx.x; v < n_vec; v += kThreads * kUnroll) {
      uint4 rp[kUnroll], rs[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t idx = v + u * kThreads;
        if (idx < n_vec) {
          rp[u] = vparam[idx];
          rs[u] = vsnap[idx];
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t idx = v + u * kThreads;
        if (idx < n_vec) {
          T* p = reinterpret_cast<T*>(&rp[u]);
          const T* s = reinterpret_cast<const T*>(&rs[u]);
#pragma unroll
          for (int e = 0; e < kVec; ++e) p[e] = lerp_one<T>(p[e], s[e], w, coeff, small);
          vparam[idx] = rp[u];
        }
      }
    }
    k = start + n_vec * kVec;
  }
  for (int64_t e = k + threadIdx.x; e < stop; e += kThreads) param[e] = lerp_one<T>(param[e], snap[e], w, coeff, small);
}

int report(cudaError_t err) {
  if (err == cudaSuccess) return 0;
  snprintf(g_last_error, sizeof(g_last_error), "%s", cudaGetErrorString(err));
  return static_cast<int>(err);
}

}  // namespace

extern "C" {

// dtype codes shared with sfpo_kernels/_cuda_lib.py
enum { SFPO_F32 = 0, SFPO_F16 = 1, SFPO_BF16 = 2, SFPO_F64 = 3 };

const char* sfpo_mt_last_error() { return g_last_error; }

int sfpo_mt_copy(const int64_t* table, int64_t n, int64_t c, int64_t chunk, int elem_size, int src_is_a, void* stream) {
  if (c == 0) return 0;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (elem_size) {
    case 2: mt_copy_kernel<uint16_t><<<c, kThreads, 0, s>>>(table, n, c, chunk, src_is_a != 0); break;
    case 4: mt_copy_kernel<uint32_t><<<c, kThreads, 0, s>>>(table, n, c, chunk, src_is_a != 0); break;
    case 8: mt_copy_kernel<uint64_t><<<c, kThreads, 0, s>>>(table, n, c, chunk, src_is_a != 0); break;
    default:
      snprintf(g_last_error, sizeof(g_last_error), "unsupported element size %d", elem_size);
      return -1;
  }
  return report(cudaGetLastError());
}

int sfpo_mt_lerp(const int64_t* table, int64_t n, int64_t c, int64_t chunk, int dtype, double weight, void* stream) {
  if (c == 0) return 0;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case SFPO_F32: mt_lerp_kernel<float><<<c, kThreads, 0, s>>>(table, n, c, chunk, weight); break;
    case SFPO_F16: mt_lerp_kernel<__half><<<c, kThreads, 0, s>>>(table, n, c, chunk, weight); break;
    case SFPO_BF16: mt_lerp_kernel<__nv_bfloat16><<<c, kThreads, 0, s>>>(table, n, c, chunk, weight); break;
    case SFPO_F64: mt_lerp_kernel<double><<<c, kThreads, 0, s>>>(table, n, c, chunk, weight); break;
    default:
      snprintf(g_last_error, sizeof(g_last_error), "unsupported dtype code %d", dtype);
      return -1;
  }
  return report(cudaGetLastError());
}

}  // extern "C"
