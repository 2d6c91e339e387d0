// Uses the installed package: a paged KV store in host memory, a few appended tokens, and one exact
// decode step. Prints one line; exits non-zero when anything is off.
#include <cmath>
#include <cstdio>
#include <vector>

#include "hattn/kv/paged_kv_store.hpp"
#include "hattn/reference/exact_attention.hpp"

// The package's exported compile definition and its CMake variable must agree.
static_assert(HATTN_WITH_CUDA == CONSUMER_SEES_CUDA, "HATTN_WITH_CUDA disagrees with HybridAttention_CUDA_FOUND");

int main() {
  const hattn::ModelShape shape{.layers = 2, .q_heads = 8, .kv_heads = 2, .head_dim = 64,
                                .kv_dtype = hattn::DType::kBFloat16};
  hattn::PagedKVStore store(shape, 16, 1 << 20);
  const hattn::SeqId seq = store.add_sequence();

  // A prefill of 20 tokens, then one decode token: K and V are [tokens][kv_heads][head_dim] in bf16.
  const auto append = [&](int first, int n) {
    std::vector<hattn::bfloat16_t> k(static_cast<std::size_t>(n) * 2 * 64), v(k.size());
    for (std::size_t i = 0; i < k.size(); ++i) {
      k[i] = hattn::to_bfloat16(std::sin(0.1f * static_cast<float>(first * 128 + i)));
      v[i] = hattn::to_bfloat16(static_cast<float>(first + i / 128));
    }
    store.append(seq, 0, hattn::TensorView::contiguous(k.data(), shape.kv_dtype, {n, 2, 64}),
                 hattn::TensorView::contiguous(v.data(), shape.kv_dtype, {n, 2, 64}));
  };
  append(0, 20);
  append(20, 1);

  const std::vector<float> q(static_cast<std::size_t>(shape.q_heads) * shape.head_dim, 0.05f);
  const hattn::reference::Partial r = hattn::reference::decode(store, seq, 0, q, 0.125);
  bool ok = store.length(seq, 0) == 21 && store.pages(seq, 0).size() == 2;
  for (double x : r.out) ok = ok && std::isfinite(x);
  for (double x : r.lse) ok = ok && std::isfinite(x);
  store.release(seq);
  ok = ok && store.pool().stats().used_pages == 0;

  std::printf("consumer %s: HybridAttention %s from %s; 21 tokens, lse[0] = %.6f, out[0] = %.6f; pool: %s (%s)%s\n",
              ok ? "ok" : "FAILED", CONSUMER_PACKAGE_VERSION, CONSUMER_PACKAGE_DIR, r.lse[0], r.out[0],
              hattn::to_string(store.pool().memory_kind()), store.pool().memory_note().c_str(),
              CONSUMER_SEES_CUDA ? "; CUDA component: found" : "");
  return ok ? 0 : 1;
}
