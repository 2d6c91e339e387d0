#pragma once
// Shared pieces of the CUDA kernel tests: device detection, RAII device buffers, and a structured
// synthetic layer (RoPE-rotated keys, sinks, a local window, planted needles) in a PagedKVStore.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "hattn/core/cuda_check.hpp"
#include "hattn/core/error.hpp"
#include "hattn/kv/paged_kv_store.hpp"

namespace hattn::test {

inline bool cuda_device_present() {
  int n = 0;
  const bool ok = cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
  cudaGetLastError();
  return ok;
}

#define HATTN_REQUIRE_CUDA_DEVICE() \
  if (!::hattn::test::cuda_device_present()) GTEST_SKIP() << "no CUDA device"

/// A device array of T, optionally uploaded from a host vector. Filled with 0xff bytes (NaN for
/// floats, -1 for ints) on creation so unwritten outputs are visible.
template <class T>
class DeviceBuffer {
 public:
  explicit DeviceBuffer(std::size_t n) : n_(n) {
    HATTN_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&ptr_), std::max<std::size_t>(1, n) * sizeof(T)));
    HATTN_CUDA_CHECK(cudaMemset(ptr_, 0xff, std::max<std::size_t>(1, n) * sizeof(T)));
  }
  explicit DeviceBuffer(const std::vector<T>& host) : DeviceBuffer(host.size()) { upload(host); }
  ~DeviceBuffer() { cudaFree(ptr_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(std::exchange(o.ptr_, nullptr)), n_(std::exchange(o.n_, 0)) {}

  void upload(const std::vector<T>& host) {
    HATTN_CUDA_CHECK(cudaMemcpy(ptr_, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  }
  std::vector<T> download() const {
    std::vector<T> host(n_);
    HATTN_CUDA_CHECK(cudaMemcpy(host.data(), ptr_, n_ * sizeof(T), cudaMemcpyDeviceToHost));
    return host;
  }
  T* get() const { return ptr_; }
  std::size_t size() const { return n_; }

 private:
  T* ptr_ = nullptr;
  std::size_t n_ = 0;
};

/// Pinned host memory mapped into the device's address space, as the CPU side's partials are.
template <class T>
class MappedBuffer {
 public:
  explicit MappedBuffer(const std::vector<T>& host) : n_(host.size()) {
    HATTN_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&ptr_), std::max<std::size_t>(1, n_) * sizeof(T),
                                   cudaHostAllocMapped | cudaHostAllocPortable));
    std::copy(host.begin(), host.end(), ptr_);
  }
  ~MappedBuffer() { cudaFreeHost(ptr_); }
  MappedBuffer(const MappedBuffer&) = delete;
  MappedBuffer& operator=(const MappedBuffer&) = delete;
  T* get() const { return ptr_; }

 private:
  T* ptr_ = nullptr;
  std::size_t n_ = 0;
};

/// Calls `call`, which must throw InvalidArgument whose message holds every one of `names`.
template <class Call, class... Names>
void expect_named(Call&& call, const Names&... names) {
  try {
    call();
    ADD_FAILURE() << "accepted a bad argument (" << ((std::string(names) + " ") + ...) << ")";
  } catch (const InvalidArgument& e) {
    const std::string what = e.what();
    ([&] { EXPECT_NE(what.find(names), std::string::npos) << what; }(), ...);
  }
}

/// A layer of several sequences whose keys have the structure real heads show: attention sinks
/// (the first 4 tokens aligned with the queries), a local window of mildly aligned recent tokens,
/// planted needles, and RoPE-rotated noise elsewhere. Values are random. One layer (layer 0).
struct StructuredLayer {
  ModelShape shape;
  int page_size;
  PagedKVStore store;
  std::vector<SeqId> seqs;
  std::vector<std::vector<float>> queries;  // per sequence [q_heads][head_dim]

  StructuredLayer(const ModelShape& s, int ps, const std::vector<std::int64_t>& lengths, std::uint32_t seed)
      : shape(s), page_size(ps), store(s, ps, pool_bytes(s, ps, lengths)) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    const int dim = s.head_dim, kvh = s.kv_heads, group = s.group_size();
    for (std::int64_t len : lengths) {
      std::vector<float> q(static_cast<std::size_t>(s.q_heads) * dim);
      for (auto& x : q) x = normal(rng);
      std::vector<float> k(static_cast<std::size_t>(len) * kvh * dim), v(k.size());
      for (std::int64_t t = 0; t < len; ++t) {
        const bool sink = t < 4;
        const bool local = t >= len - 3 * ps;
        const bool needle = len > 64 && (t % 97) == 41;
        for (int h = 0; h < kvh; ++h) {
          float* kr = &k[(static_cast<std::size_t>(t) * kvh + h) * dim];
          float* vr = &v[(static_cast<std::size_t>(t) * kvh + h) * dim];
          for (int d = 0; d < dim; ++d) {
            kr[d] = 0.5f * normal(rng);
            vr[d] = normal(rng);
          }
          // RoPE on the noise part: rotate dim pairs by position-dependent angles.
          for (int d = 0; d < dim / 2; ++d) {
            const double theta = static_cast<double>(t) * std::pow(10000.0, -2.0 * d / dim);
            const float c = static_cast<float>(std::cos(theta)), sn = static_cast<float>(std::sin(theta));
            const float a = kr[d], bb = kr[d + dim / 2];
            kr[d] = a * c - bb * sn;
            kr[d + dim / 2] = a * sn + bb * c;
          }
          const float pull = sink ? 0.35f : needle ? 0.25f : local ? 0.1f : 0.0f;
          const float* qh = &q[static_cast<std::size_t>(h * group) * dim];
          for (int d = 0; d < dim; ++d) kr[d] += pull * qh[d];
        }
      }
      const SeqId id = store.add_sequence();
      store.append(id, 0, host_view(k, len), host_view(v, len));
      scratch_views_.clear();
      seqs.push_back(id);
      queries.push_back(std::move(q));
    }
  }

  std::int64_t length(std::size_t b) const { return store.length(seqs[b], 0); }

 private:
  static std::size_t pool_bytes(const ModelShape& s, int ps, const std::vector<std::int64_t>& lengths) {
    const PageLayout l{ps, s.kv_heads, s.head_dim, s.kv_dtype};
    std::int64_t pages = 0;
    for (auto len : lengths) pages += (len + ps - 1) / ps;
    return static_cast<std::size_t>(pages + 1) * (l.page_bytes() + l.summary_bytes());
  }
  TensorView host_view(const std::vector<float>& x, std::int64_t len) {
    // Converted into the KV dtype; the store copies it, so one scratch buffer per call suffices.
    const std::size_t n = x.size();
    auto& buf = scratch_views_.emplace_back(n * dtype_bytes(shape.kv_dtype));
    for (std::size_t i = 0; i < n; ++i) store_from_float(buf.data(), i, shape.kv_dtype, x[i]);
    return TensorView::contiguous(buf.data(), shape.kv_dtype, {len, shape.kv_heads, shape.head_dim});
  }
  std::vector<std::vector<std::byte>> scratch_views_;
};

}  // namespace hattn::test
