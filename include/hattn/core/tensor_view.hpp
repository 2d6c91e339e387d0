#pragma once
// A non-owning typed view of a dense tensor, so engines pass their own buffers without copies.
#include <array>
#include <cstdint>
#include <initializer_list>
#include <ostream>

#include "hattn/core/dtype.hpp"
#include "hattn/core/error.hpp"

namespace hattn {

enum class Device : std::uint8_t { kHost, kCuda };

constexpr const char* to_string(Device d) noexcept { return d == Device::kHost ? "host" : "cuda"; }

/// Pointer, shape, strides (in elements), dtype and device. Rank at most 4.
struct TensorView {
  static constexpr int kMaxRank = 4;
  void* data = nullptr;
  DType dtype = DType::kFloat32;
  Device device = Device::kHost;
  int rank = 0;
  std::array<std::int64_t, kMaxRank> shape{};
  std::array<std::int64_t, kMaxRank> stride{};

  /// A row-major (contiguous) view.
  static TensorView contiguous(const void* data, DType dtype, std::initializer_list<std::int64_t> dims,
                               Device device = Device::kHost) {
    TensorView v;
    v.data = const_cast<void*>(data);
    v.dtype = dtype;
    v.device = device;
    v.rank = static_cast<int>(dims.size());
    int i = 0;
    for (auto d : dims) v.shape[i++] = d;
    std::int64_t s = 1;
    for (int k = v.rank - 1; k >= 0; --k) {
      v.stride[k] = s;
      s *= v.shape[k];
    }
    return v;
  }

  std::int64_t numel() const noexcept {
    std::int64_t n = 1;
    for (int k = 0; k < rank; ++k) n *= shape[k];
    return n;
  }

  bool is_contiguous() const noexcept {
    std::int64_t s = 1;
    for (int k = rank - 1; k >= 0; --k) {
      if (shape[k] != 1 && stride[k] != s) return false;
      s *= shape[k];
    }
    return true;
  }
};

inline std::ostream& operator<<(std::ostream& os, const TensorView& v) {
  os << v.dtype << "[";
  for (int k = 0; k < v.rank; ++k) os << (k ? ", " : "") << v.shape[k];
  return os << "]@" << to_string(v.device);
}

namespace detail {

/// Checks that `v` is a contiguous tensor of `dtype` with exactly `dims` (-1 matches any extent).
inline void require_tensor(const TensorView& v, const char* where, const char* name, DType dtype,
                           std::initializer_list<std::int64_t> dims) {
  if (v.data == nullptr && v.numel() != 0) throw InvalidArgument(concat(where, ": ", name, " is null"));
  if (v.dtype != dtype)
    throw InvalidArgument(concat(where, ": ", name, " must have dtype ", dtype, " (got ", v.dtype, ")"));
  bool ok = v.rank == static_cast<int>(dims.size());
  for (int k = 0; ok && k < v.rank; ++k) ok = v.shape[k] >= 0;  // a negative extent is never a shape
  int k = 0;
  for (auto d : dims) {
    if (ok && d >= 0 && v.shape[k] != d) ok = false;
    ++k;
  }
  if (!ok) {
    std::ostringstream want;
    want << "[";
    k = 0;
    for (auto d : dims) {
      want << (k++ ? ", " : "");
      if (d < 0) want << "*"; else want << d;
    }
    want << "]";
    throw InvalidArgument(concat(where, ": ", name, " must have shape ", want.str(), " (got ", v, ")"));
  }
  if (!v.is_contiguous())
    throw InvalidArgument(concat(where, ": ", name, " must be contiguous (got ", v, ")"));
}

}  // namespace detail
}  // namespace hattn
