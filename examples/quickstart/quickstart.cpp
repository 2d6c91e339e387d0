// Quickstart: one long-context layer with structured heads (sinks, local heads, retrieval heads with
// needles, clustered and diffuse heads, RoPE), decoded step by step with the default policies (the
// Fluxion combination) and with the fixed 5% hybrid baseline. Prints the output error against exact
// attention, the budget used and the time per step. Runs on the GPU when one is present, else on the CPU.
#include <CLI/CLI.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <vector>

#include "hattn/hybrid_attention.hpp"
#include "hattn/reference/exact_attention.hpp"
#include "zoo/head_zoo.hpp"

#if HATTN_WITH_CUDA
#include <cuda_runtime_api.h>

#include "hattn/core/cuda_check.hpp"
#endif

namespace {

struct Options {
  std::int64_t tokens = 32768;
  int steps = 4;
  int layer = 12;  // a Llama-3-8B layer with a mix of head kinds
  double budget = 0.05;
  bool cpu = false;
};

// Queries and outputs where the backend wants them: device buffers on the GPU, host vectors on the CPU.
class Buffers {
 public:
  Buffers(std::size_t count, bool device) : host_(count), device_(device) {
#if HATTN_WITH_CUDA
    if (device_) {
      HATTN_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&q_), count * sizeof(float)));
      HATTN_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&out_), count * sizeof(float)));
    }
#endif
  }
  ~Buffers() {
#if HATTN_WITH_CUDA
    if (device_) {
      cudaFree(q_);
      cudaFree(out_);
    }
#endif
  }
  float* q(const std::vector<float>& values) {
#if HATTN_WITH_CUDA
    if (device_) {
      HATTN_CUDA_CHECK(cudaMemcpy(q_, values.data(), values.size() * sizeof(float), cudaMemcpyHostToDevice));
      return q_;
    }
#endif
    q_host_ = values;
    return q_host_.data();
  }
  float* out() { return device_ ? out_ : host_.data(); }
  const std::vector<float>& result() {
#if HATTN_WITH_CUDA
    if (device_) HATTN_CUDA_CHECK(cudaMemcpy(host_.data(), out_, host_.size() * sizeof(float), cudaMemcpyDeviceToHost));
#endif
    return host_;
  }

 private:
  std::vector<float> host_, q_host_;
  bool device_;
  float* q_ = nullptr;
  float* out_ = nullptr;
};

void synchronize(bool device) {
#if HATTN_WITH_CUDA
  if (device) HATTN_CUDA_CHECK(cudaDeviceSynchronize());
#else
  (void)device;
#endif
}

template <class Attention>
void decode(const char* name, Attention& attn, const hattn::zoo::HeadZoo& zoo, const Options& opt) {
  const hattn::ModelShape& shape = attn.config().shape;
  const hattn::SeqId seq = attn.add_sequence();
  const std::size_t row = static_cast<std::size_t>(shape.kv_heads) * shape.head_dim;
  std::vector<hattn::bfloat16_t> keys(static_cast<std::size_t>(opt.tokens) * row), values(keys.size());
  zoo.tokens(0, 0, opt.tokens, keys, values);
  attn.append(seq, 0, hattn::TensorView::contiguous(keys.data(), hattn::DType::kBFloat16, {opt.tokens, shape.kv_heads, shape.head_dim}),
              hattn::TensorView::contiguous(values.data(), hattn::DType::kBFloat16, {opt.tokens, shape.kv_heads, shape.head_dim}));

  const bool device = attn.backend() == hattn::Backend::kGpu;
  const std::size_t count = static_cast<std::size_t>(shape.q_heads) * shape.head_dim;
  Buffers buffers(count, device);
  const hattn::Device where = device ? hattn::Device::kCuda : hattn::Device::kHost;
  const std::vector<hattn::SeqId> rows{seq};
  std::vector<float> q(count);
  std::vector<hattn::bfloat16_t> k1(row), v1(row);
  for (int step = 0; step < opt.steps; ++step) {
    // The new token of this step is appended first, then attended by its own query.
    zoo.tokens(0, zoo.step_position(step), 1, k1, v1);
    attn.append(seq, 0, hattn::TensorView::contiguous(k1.data(), hattn::DType::kBFloat16, {1, shape.kv_heads, shape.head_dim}),
                hattn::TensorView::contiguous(v1.data(), hattn::DType::kBFloat16, {1, shape.kv_heads, shape.head_dim}));
    zoo.query(0, step, q);
    float* q_ptr = buffers.q(q);
    const auto t0 = std::chrono::steady_clock::now();
    const hattn::Plan plan = attn.plan(rows);
    attn.run(plan, 0, hattn::TensorView::contiguous(q_ptr, hattn::DType::kFloat32, {1, shape.q_heads, shape.head_dim}, where),
             hattn::TensorView::contiguous(buffers.out(), hattn::DType::kFloat32, {1, shape.q_heads, shape.head_dim}, where));
    synchronize(device);
    const double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
    const hattn::StepStats& s = attn.stats(0);
    const auto exact = hattn::reference::decode(attn.store(), seq, 0, q, attn.config().logit_scale());
    const auto& out = buffers.result();
    double num = 0, den = 0;
    for (std::size_t i = 0; i < count; ++i) {
      num += (out[i] - exact.out[i]) * (out[i] - exact.out[i]);
      den += exact.out[i] * exact.out[i];
    }
    std::printf("%-22s step %d: output rel. error %.2e, budget used %5.2f%%, cpu/gpu pages %lld/%lld, %8.1f us\n", name,
                step, std::sqrt(num / den), 100.0 * s.budget_used(), static_cast<long long>(s.cpu_blocks),
                static_cast<long long>(s.gpu_blocks), us);
  }
  attn.release(seq);
}

}  // namespace

int main(int argc, char** argv) {
  Options opt;
  CLI::App app{"HybridAttention quickstart: hybrid sparse decode over a synthetic long-context layer"};
  app.add_option("--tokens", opt.tokens, "context tokens")->check(CLI::Range(1024, 1 << 20));
  app.add_option("--steps", opt.steps, "decode steps")->check(CLI::Range(1, 64));
  app.add_option("--layer", opt.layer, "Llama-3-8B layer whose head mix to use")->check(CLI::Range(0, 31));
  app.add_option("--budget", opt.budget, "average share of pages per head")->check(CLI::Range(0.001, 1.0));
  app.add_flag("--cpu", opt.cpu, "force the CPU backend");
  CLI11_PARSE(app, argc, argv);

  try {
    hattn::zoo::ZooConfig zc;
    zc.layers = {opt.layer};
    zc.context_tokens = opt.tokens;
    const hattn::zoo::HeadZoo zoo(zc, opt.steps);

    hattn::Config config;
    config.shape = zoo.shape();
    config.page_size = 16;
    const std::size_t kv_bytes = static_cast<std::size_t>(opt.tokens + opt.steps) * config.shape.kv_heads *
                                 config.shape.head_dim * 2 * 2;
    config.host_pool_bytes = kv_bytes + kv_bytes / 4 + (16u << 20);
    config.hbm_cache_bytes = kv_bytes / 5;  // at most a fifth of the KV in HBM
    config.avg_budget = opt.budget;
    config.backend = opt.cpu ? hattn::Backend::kCpu : hattn::Backend::kAuto;

    hattn::FluxionAttention fluxion(config);
    std::printf("HybridAttention quickstart: %lld tokens, shape %s, backend %s, CPU kernels %s\n",
                static_cast<long long>(opt.tokens), [&] {
                  static char buf[128];
                  std::snprintf(buf, sizeof buf, "%dq/%dkv x %d", config.shape.q_heads, config.shape.kv_heads,
                                config.shape.head_dim);
                  return buf;
                }(),
                hattn::to_string(fluxion.backend()), hattn::to_string(fluxion.cpu_isa()));
    decode("fluxion (default)", fluxion, zoo, opt);
    hattn::Fixed5HybridAttention fixed(config, {}, hattn::FixedBudget(opt.budget));
    decode("fixed-budget hybrid", fixed, zoo, opt);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
