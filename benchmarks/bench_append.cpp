// Append throughput into the host KV pool, in GB/s of K+V bytes written (SetBytesProcessed), for
// prefill chunks and single-token decode appends, over page sizes and KV dtypes. The time includes
// what an append costs an engine: page allocation, the HND scatter and the summary update.
//
// The ceiling to compare against is the host's copy bandwidth: BM_MemcpyCeiling measures memcpy of
// the same bytes in the same process.
#include <benchmark/benchmark.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "hattn/kv/paged_kv_store.hpp"

namespace {

// Llama-3-8B-shaped layer: 8 KV heads of dim 128.
constexpr int kKvHeads = 8;
constexpr int kHeadDim = 128;
// Tokens per sequence before it is released and a fresh one started (outside the timed region).
constexpr std::int64_t kSeqTokens = 16384;

hattn::DType dtype_of(std::int64_t i) {
  return i == 0 ? hattn::DType::kBFloat16 : i == 1 ? hattn::DType::kFloat16 : hattn::DType::kFloat32;
}

// Args: page size, dtype index (0 bf16, 1 fp16, 2 fp32), tokens per append (1 = decode).
void BM_Append(benchmark::State& state) {
  const int page_size = static_cast<int>(state.range(0));
  const hattn::DType dtype = dtype_of(state.range(1));
  const std::int64_t tokens = state.range(2);
  const hattn::ModelShape shape{.layers = 1, .q_heads = 4 * kKvHeads, .kv_heads = kKvHeads, .head_dim = kHeadDim,
                                .kv_dtype = dtype};
  const hattn::PageLayout layout{page_size, kKvHeads, kHeadDim, dtype};
  const std::int64_t pages = kSeqTokens / page_size + 1;
  hattn::PagedKVStore store(shape, page_size, static_cast<std::size_t>(pages) * (layout.page_bytes() + layout.summary_bytes()),
                            hattn::HostMemoryRequest::kAligned);

  const std::size_t elems = static_cast<std::size_t>(tokens) * kKvHeads * kHeadDim;
  std::vector<std::byte> k(elems * hattn::dtype_bytes(dtype)), v(k.size());
  for (std::size_t i = 0; i < elems; ++i) {
    hattn::store_from_float(k.data(), i, dtype, std::sin(0.01f * static_cast<float>(i)));
    hattn::store_from_float(v.data(), i, dtype, std::cos(0.01f * static_cast<float>(i)));
  }
  const auto kv = hattn::TensorView::contiguous(k.data(), dtype, {tokens, kKvHeads, kHeadDim});
  const auto vv = hattn::TensorView::contiguous(v.data(), dtype, {tokens, kKvHeads, kHeadDim});

  hattn::SeqId seq = store.add_sequence();
  for (auto _ : state) {
    if (store.length(seq, 0) + tokens > kSeqTokens) {
      state.PauseTiming();
      store.release(seq);
      seq = store.add_sequence();
      state.ResumeTiming();
    }
    store.append(seq, 0, kv, vv);
  }
  const auto bytes = static_cast<std::int64_t>(2 * k.size());
  state.SetBytesProcessed(state.iterations() * bytes);
  state.SetItemsProcessed(state.iterations() * tokens);  // tokens/s
  state.SetLabel(std::string(hattn::to_string(dtype)) + (tokens == 1 ? " decode" : " prefill"));
}

void append_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"page_size", "dtype", "tokens"});
  for (int ps : {16, 32, 64})
    for (int dt : {0, 1, 2})
      for (int tokens : {1, 512}) b->Args({ps, dt, tokens});
}
BENCHMARK(BM_Append)->Apply(append_args);

// The ceiling: memcpy of the same K+V bytes (512 tokens, bf16) between two buffers of this process.
void BM_MemcpyCeiling(benchmark::State& state) {
  const std::size_t bytes = static_cast<std::size_t>(state.range(0)) * kKvHeads * kHeadDim * 2 * 2;
  std::vector<std::byte> src(bytes, std::byte{1});
  // Cycle over a destination as large as a sequence so the copy does not stay in cache.
  const std::size_t dst_bytes = static_cast<std::size_t>(kSeqTokens) * kKvHeads * kHeadDim * 2 * 2;
  std::vector<std::byte> dst(dst_bytes);
  std::size_t at = 0;
  for (auto _ : state) {
    if (at + bytes > dst_bytes) at = 0;
    std::memcpy(dst.data() + at, src.data(), bytes);
    benchmark::DoNotOptimize(dst.data());
    at += bytes;
  }
  state.SetBytesProcessed(state.iterations() * static_cast<std::int64_t>(bytes));
}
BENCHMARK(BM_MemcpyCeiling)->ArgName("tokens")->Arg(512);

}  // namespace

BENCHMARK_MAIN();
