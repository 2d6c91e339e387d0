// hattn-eval: accuracy of every policy combination on the head zoo, against exact attention.
// For each context, system and average budget it builds one HybridAttention object, appends the
// zoo's prompt, then runs decode steps (one new token per step, drifting queries) and compares every
// layer's output with exact attention in double. Per head kind it reports output relative L2 error,
// LSE error of the selected set, attention-mass recall, needle hit rate and budget used; writes
// docs/results/quality.json and a markdown table. CPU backend by default (runs anywhere), --gpu for
// the device.
#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "hattn/hybrid_attention.hpp"
#include "metrics.hpp"
#include "results_json.hpp"
#include "zoo/head_zoo.hpp"

#if HATTN_WITH_CUDA
#include <cuda_runtime.h>

#include "hattn/core/cuda_check.hpp"
#endif

namespace {

using namespace hattn;
using hattn::eval::MetricSums;
using hattn::zoo::HeadKind;

struct Options {
  std::string model = "llama";
  std::vector<std::int64_t> contexts;
  std::vector<double> budgets;
  std::vector<std::string> systems;
  int layers = 0;
  int warmup = 0;
  int steps = 0;
  int threads = 0;
  int page_size = 16;
  double hbm_share = 0.15;
  double coarse_keep = 4.0;  // fluxion_2l
  std::uint64_t seed = 1;
  bool gpu = false;
  bool quick = false;
  std::string json = "docs/results/quality.json";
  std::string md = "docs/results/quality.md";
  std::string commit;
};

// One system of the comparison: how to build it at an average budget.
struct System {
  std::string name;
  std::string what;
  bool dense = false;  // runs at budget 1.0 only
};

const std::vector<System> kSystems = {
    {"fluxion", "OnlineHeadProfile + OutputAware + Priority (the default)", false},
    {"fluxion_2l", "the default with two-level scoring (Config::coarse_keep = --coarse_keep)", false},
    {"fixed", "FixedBudget(b) + HybridGenFeedback (the fixed hybrid baseline; b = 0.05 is Fixed5)", false},
    {"quest_gpu", "FixedBudget(b) + GpuOnly (Quest-like)", false},
    {"psa", "MassThreshold(0.95, cap b) + GpuOnly (PSA-like)", false},
    {"dense", "FixedBudget(1.0) + CpuOnly (exactness check)", true},
    {"oracle", "the best any page selection can do at the average budget: per layer, the pages with the largest "
               "exact mass (summed over each GQA group) across all KV heads; no object runs, so no output error",
     false},
};

// Everything of one context that does not depend on the system: tokens, queries, exact attention.
struct ContextData {
  std::unique_ptr<zoo::HeadZoo> zoo;
  std::vector<std::vector<bfloat16_t>> keys, values;          // [layer][tokens][kv_heads][dim]
  std::vector<std::vector<std::vector<float>>> queries;        // [step][layer][q_heads * dim]
  std::vector<std::vector<eval::ExactLayer>> exact;            // [step][layer]
};

std::vector<int> spread_layers(int model_layers, int n) {
  if (n <= 0 || n >= model_layers) {
    std::vector<int> all(static_cast<std::size_t>(model_layers));
    for (int i = 0; i < model_layers; ++i) all[i] = i;
    return all;
  }
  std::vector<int> out;
  for (int i = 0; i < n; ++i) out.push_back(n == 1 ? 0 : static_cast<int>(std::lround(i * (model_layers - 1.0) / (n - 1))));
  return out;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

ContextData prepare(const Options& o, std::int64_t context) {
  ContextData d;
  zoo::ZooConfig zc;
  zc.model = o.model == "qwen" ? zoo::qwen_shape() : zoo::llama3_8b_shape();
  zc.layers = spread_layers(zc.model.layers, o.layers);
  zc.context_tokens = context;
  zc.seed = o.seed;
  const int total_steps = o.warmup + o.steps;
  d.zoo = std::make_unique<zoo::HeadZoo>(zc, total_steps);
  const ModelShape& s = d.zoo->shape();
  const std::int64_t n = context + total_steps;
  const std::size_t per_token = static_cast<std::size_t>(s.kv_heads) * s.head_dim;
  auto t0 = std::chrono::steady_clock::now();
  d.keys.resize(static_cast<std::size_t>(s.layers));
  d.values.resize(static_cast<std::size_t>(s.layers));
  for (int l = 0; l < s.layers; ++l) {
    d.keys[l].resize(static_cast<std::size_t>(n) * per_token);
    d.values[l].resize(d.keys[l].size());
    d.zoo->tokens(l, 0, n, d.keys[l], d.values[l]);
  }
  std::fprintf(stderr, "[eval] context %lld: generated %d layers x %lld tokens in %.1f s\n",
               static_cast<long long>(context), s.layers, static_cast<long long>(n), seconds_since(t0));
  t0 = std::chrono::steady_clock::now();
  d.queries.resize(static_cast<std::size_t>(total_steps));
  d.exact.resize(static_cast<std::size_t>(total_steps));
  for (int st = 0; st < total_steps; ++st) {
    for (int l = 0; l < s.layers; ++l) {
      std::vector<float> q(static_cast<std::size_t>(s.q_heads) * s.head_dim);
      d.zoo->query(l, st, q);
      d.queries[st].push_back(q);
      // Only measured steps need the exact side.
      if (st >= o.warmup)
        d.exact[st].push_back(eval::exact_layer(d.keys[l], d.values[l], context + st + 1, s, q, d.zoo->scale(),
                                                o.page_size, o.threads));
      else
        d.exact[st].emplace_back();
    }
  }
  std::fprintf(stderr, "[eval] context %lld: exact attention of %d steps x %d layers in %.1f s\n",
               static_cast<long long>(context), o.steps, s.layers, seconds_since(t0));
  return d;
}

// Results keyed by (system, budget, kind); kind -1 = every head.
struct Key {
  std::string system;
  double budget;
  int kind;
  auto operator<=>(const Key&) const = default;
};

class DeviceBuffers {
 public:
  DeviceBuffers(bool gpu, std::size_t floats) : gpu_(gpu) {
#if HATTN_WITH_CUDA
    if (gpu_) {
      HATTN_CUDA_CHECK(cudaMalloc(&q_, floats * sizeof(float)));
      HATTN_CUDA_CHECK(cudaMalloc(&out_, floats * sizeof(float)));
      HATTN_CUDA_CHECK(cudaStreamCreate(&stream_));
    }
#else
    (void)floats;
#endif
  }
  ~DeviceBuffers() {
#if HATTN_WITH_CUDA
    if (gpu_) {
      cudaFree(q_);
      cudaFree(out_);
      cudaStreamDestroy(stream_);
    }
#endif
  }
  DeviceBuffers(const DeviceBuffers&) = delete;
  DeviceBuffers& operator=(const DeviceBuffers&) = delete;
  // Runs one layer: host q in, host out back.
  template <class Attn>
  void run(Attn& attn, const Plan& plan, int layer, std::vector<float>& q, std::vector<float>& out, const ModelShape& s) {
    const std::int64_t b = 1;
    if (!gpu_) {
      attn.run(plan, layer, TensorView::contiguous(q.data(), DType::kFloat32, {b, s.q_heads, s.head_dim}),
               TensorView::contiguous(out.data(), DType::kFloat32, {b, s.q_heads, s.head_dim}));
      return;
    }
#if HATTN_WITH_CUDA
    const std::size_t bytes = q.size() * sizeof(float);
    HATTN_CUDA_CHECK(cudaMemcpyAsync(q_, q.data(), bytes, cudaMemcpyHostToDevice, stream_));
    attn.run(plan, layer, TensorView::contiguous(q_, DType::kFloat32, {b, s.q_heads, s.head_dim}, Device::kCuda),
             TensorView::contiguous(out_, DType::kFloat32, {b, s.q_heads, s.head_dim}, Device::kCuda), stream_);
    HATTN_CUDA_CHECK(cudaMemcpyAsync(out.data(), out_, bytes, cudaMemcpyDeviceToHost, stream_));
    HATTN_CUDA_CHECK(cudaStreamSynchronize(stream_));
#endif
  }

 private:
  bool gpu_;
#if HATTN_WITH_CUDA
  float* q_ = nullptr;
  float* out_ = nullptr;
  cudaStream_t stream_ = nullptr;
#endif
};

// What a selection of KV head h captures, into m: per query head of its group the mass recall and
// the LSE error it implies, and whether the needles the head looks for at this step are covered.
void add_selection_metrics(const zoo::HeadZoo& zoo, const eval::ExactLayer& ex, int layer, int h, int step,
                           std::span<const std::int32_t> sel, int page_size, MetricSums& m) {
  const int group = zoo.shape().group_size();
  for (int g = 0; g < group; ++g) {
    const std::size_t qh = static_cast<std::size_t>(h * group + g);
    const double recall = eval::mass_recall(std::span<const double>(ex.page_mass).subspan(qh * ex.pages, ex.pages), sel);
    m.mass_recall += recall;
    m.lse_error += eval::lse_error_of_recall(recall);
    ++m.q_samples;
  }
  for (const zoo::Span& t : zoo.targets(layer, h, step)) {
    ++m.needles;
    m.needle_hits += eval::needle_hit(sel, t.begin, t.length, page_size);
  }
}

template <class Attn>
void evaluate(Attn& attn, const Options& o, const ContextData& d, std::int64_t context,
              std::map<int, MetricSums>& by_kind) {
  const zoo::HeadZoo& zoo = *d.zoo;
  const ModelShape& s = zoo.shape();
  const std::size_t per_token = static_cast<std::size_t>(s.kv_heads) * s.head_dim;
  const SeqId seq = attn.add_sequence();
  for (int l = 0; l < s.layers; ++l)
    attn.append(seq, l, TensorView::contiguous(d.keys[l].data(), DType::kBFloat16, {context, s.kv_heads, s.head_dim}),
                TensorView::contiguous(d.values[l].data(), DType::kBFloat16, {context, s.kv_heads, s.head_dim}));
  DeviceBuffers dev(o.gpu, static_cast<std::size_t>(s.q_heads) * s.head_dim);
  std::vector<float> out(static_cast<std::size_t>(s.q_heads) * s.head_dim);
  const int group = s.group_size();
  const Config& cfg = attn.config();
  for (int st = 0; st < o.warmup + o.steps; ++st) {
    const std::int64_t pos = context + st;
    for (int l = 0; l < s.layers; ++l)
      attn.append(seq, l, TensorView::contiguous(&d.keys[l][static_cast<std::size_t>(pos) * per_token], DType::kBFloat16, {1, s.kv_heads, s.head_dim}),
                  TensorView::contiguous(&d.values[l][static_cast<std::size_t>(pos) * per_token], DType::kBFloat16, {1, s.kv_heads, s.head_dim}));
    const SeqId rows[1] = {seq};
    const Plan plan = attn.plan(rows);
    for (int l = 0; l < s.layers; ++l) {
      std::vector<float> q = d.queries[st][l];
      dev.run(attn, plan, l, q, out, s);
      const StepStats& stats = attn.stats(l);
      if (st < o.warmup) continue;
      const eval::ExactLayer& ex = d.exact[st][l];
      const int pages = ex.pages;
      for (int h = 0; h < s.kv_heads; ++h) {
        MetricSums m;
        const auto sel = eval::replay_selection(
            attn.store(), seq, l, h, std::span<const float>(q).subspan(static_cast<std::size_t>(h) * group * s.head_dim, static_cast<std::size_t>(group) * s.head_dim),
            cfg.logit_scale(), plan.rules[l][h], cfg.sink_pages, cfg.local_pages,
            attn.backend() == Backend::kCpu, cfg.coarse_keep);
        const int counted = stats.selected_pages.size() > static_cast<std::size_t>(h) ? stats.selected_pages[h] : -1;
        ++m.replay_checked;
        m.replay_matched += counted == static_cast<int>(sel.size());
        m.budget = static_cast<double>(counted >= 0 ? counted : static_cast<int>(sel.size())) / pages;
        m.segments = 1;
        for (int g = 0; g < group; ++g) {
          const std::size_t qh = static_cast<std::size_t>(h * group + g);
          m.output_error += eval::relative_l2(std::span<const float>(out).subspan(qh * s.head_dim, s.head_dim),
                                              std::span<const double>(ex.out).subspan(qh * s.head_dim, s.head_dim));
        }
        add_selection_metrics(zoo, ex, l, h, st, sel, o.page_size, m);
        by_kind[static_cast<int>(zoo.kind(l, h))].add(m);
        by_kind[-1].add(m);
      }
    }
  }
  attn.release(seq);
}

// The ceiling of every selector at an average budget (eval::oracle_selection).
void evaluate_oracle(const Options& o, const ContextData& d, double budget, std::map<int, MetricSums>& by_kind) {
  const zoo::HeadZoo& zoo = *d.zoo;
  const ModelShape& s = zoo.shape();
  const int group = s.group_size();
  for (int st = o.warmup; st < o.warmup + o.steps; ++st)
    for (int l = 0; l < s.layers; ++l) {
      const eval::ExactLayer& ex = d.exact[st][l];
      const auto sel = eval::oracle_selection(ex, s.kv_heads, group, budget);
      for (int h = 0; h < s.kv_heads; ++h) {
        MetricSums m;
        m.has_output = false;
        m.budget = static_cast<double>(sel[h].size()) / ex.pages;
        m.segments = 1;
        add_selection_metrics(zoo, ex, l, h, st, sel[h], o.page_size, m);
        by_kind[static_cast<int>(zoo.kind(l, h))].add(m);
        by_kind[-1].add(m);
      }
    }
}

Config make_config(const Options& o, const ModelShape& s, std::int64_t context, double budget) {
  const PageLayout layout{o.page_size, s.kv_heads, s.head_dim, s.kv_dtype};
  const std::int64_t pages = (context + o.warmup + o.steps + o.page_size - 1) / o.page_size + 2;
  Config c;
  c.shape = s;
  c.page_size = o.page_size;
  c.host_pool_bytes = static_cast<std::size_t>(pages * s.layers) * (layout.page_bytes() + layout.summary_bytes());
  c.hbm_cache_bytes = o.gpu ? static_cast<std::size_t>(o.hbm_share * static_cast<double>(pages * s.layers) * layout.page_bytes()) : 0;
  c.cpu_threads = o.threads;
  c.avg_budget = budget;
  c.backend = o.gpu ? Backend::kGpu : Backend::kCpu;
  return c;
}

void run_system(const std::string& name, const Options& o, const ContextData& d, std::int64_t context, double budget,
                std::map<int, MetricSums>& by_kind) {
  if (name == "oracle") {
    evaluate_oracle(o, d, budget, by_kind);
    return;
  }
  const Config c = make_config(o, d.zoo->shape(), context, budget);
  if (name == "fluxion") {
    FluxionAttention a(c);
    evaluate(a, o, d, context, by_kind);
  } else if (name == "fluxion_2l") {
    Config two_level = c;
    two_level.coarse_keep = o.coarse_keep;
    FluxionAttention a(two_level);
    evaluate(a, o, d, context, by_kind);
  } else if (name == "fixed") {
    Fixed5HybridAttention a(c, {}, FixedBudget(budget));
    evaluate(a, o, d, context, by_kind);
  } else if (name == "quest_gpu") {
    QuestGpuAttention a(c, {}, FixedBudget(budget));
    evaluate(a, o, d, context, by_kind);
  } else if (name == "psa") {
    PsaAttention a(c, {}, MassThreshold(0.95f, budget));
    evaluate(a, o, d, context, by_kind);
  } else if (name == "dense") {
    DenseCpuAttention a(c, {}, FixedBudget(1.0));
    evaluate(a, o, d, context, by_kind);
  } else {
    throw InvalidArgument(detail::concat("hattn-eval: --systems has unknown system '", name,
                                         "' (fluxion, fluxion_2l, fixed, quest_gpu, psa, dense, oracle)"));
  }
}

std::string kind_name(int k) { return k < 0 ? "all" : zoo::to_string(static_cast<HeadKind>(k)); }

std::string fmt(double v, int prec = 4) {
  if (v < 0) return "-";
  std::ostringstream s;
  s << std::fixed << std::setprecision(prec) << v;
  return s.str();
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  CLI::App app{"hattn-eval: accuracy of the policy combinations on the structured head zoo"};
  app.add_option("--model", o.model, "zoo model shape: llama (32x8 KV heads, group 4) or qwen (28x4, group 7)")
      ->check(CLI::IsMember({"llama", "qwen"}));
  app.add_option("--contexts", o.contexts, "prompt lengths in tokens (default 8192 with --quick, else 32768 131072)");
  app.add_option("--budgets", o.budgets, "average budgets, shares of pages in (0, 1] (default 0.02 0.05 0.1 0.2)");
  app.add_option("--systems", o.systems,
                 "fluxion fluxion_2l fixed quest_gpu psa dense oracle (default: all but fluxion_2l; quest_gpu only with --gpu)");
  app.add_option("--coarse_keep", o.coarse_keep, "fluxion_2l: groups kept as a multiple of the page budget (>= 1)");
  app.add_option("--layers", o.layers, "generated layers, spread over the model (0 = all; default 6 quick, 8 full)");
  app.add_option("--warmup", o.warmup, "decode steps before measuring (predictor and cache settle)");
  app.add_option("--steps", o.steps, "measured decode steps");
  app.add_option("--threads", o.threads, "CPU threads of the object and of the exact side (0 = all)");
  app.add_option("--page_size", o.page_size, "tokens per page")->check(CLI::IsMember({16, 32, 64}));
  app.add_option("--hbm_share", o.hbm_share, "HBM cache as a share of the KV bytes (--gpu)");
  app.add_option("--seed", o.seed, "zoo seed");
  app.add_flag("--gpu", o.gpu, "run the objects on the GPU backend");
  app.add_flag("--quick", o.quick, "small run: 8K context, 6 layers, 2 warm-up + 3 measured steps");
  app.add_option("--json", o.json, "results file");
  app.add_option("--md", o.md, "markdown table file ('' = none)");
  app.add_option("--commit", o.commit, "commit to record (default: env HATTN_COMMIT)");
  CLI11_PARSE(app, argc, argv);

  if (o.contexts.empty()) o.contexts = o.quick ? std::vector<std::int64_t>{8192} : std::vector<std::int64_t>{32768, 131072};
  if (o.budgets.empty()) o.budgets = {0.02, 0.05, 0.1, 0.2};
  if (o.layers == 0) o.layers = o.quick ? 6 : 8;
  if (o.warmup == 0) o.warmup = o.quick ? 2 : 4;
  if (o.steps == 0) o.steps = o.quick ? 3 : 8;
  if (o.systems.empty()) {
    o.systems = {"fluxion", "fixed", "psa", "dense", "oracle"};
    // On the CPU backend the scheduler has no GPU side to split with: quest_gpu selects exactly as
    // fixed does, so it only runs with --gpu.
    if (o.gpu) o.systems.insert(o.systems.begin() + 2, "quest_gpu");
  }
  for (double b : o.budgets)
    if (!(b > 0 && b <= 1)) {
      std::cerr << "hattn-eval: --budgets must be in (0, 1] (got " << b << ")\n";
      return 2;
    }

  try {
    std::map<Key, MetricSums> results;
    const auto t_start = std::chrono::steady_clock::now();
    for (std::int64_t context : o.contexts) {
      const ContextData d = prepare(o, context);
      for (const std::string& sys : o.systems) {
        const bool dense = sys == "dense";
        for (double b : dense ? std::vector<double>{1.0} : o.budgets) {
          const auto t0 = std::chrono::steady_clock::now();
          std::map<int, MetricSums> by_kind;
          run_system(sys, o, d, context, b, by_kind);
          for (auto& [k, m] : by_kind) results[Key{sys, b, k}].add(m);
          const MetricSums& all = by_kind[-1];
          std::fprintf(stderr, "[eval] ctx %lld %-9s budget %.2f: err %s recall %.4f needle %.3f used %.4f (%.1f s)\n",
                       static_cast<long long>(context), sys.c_str(), b, fmt(all.mean_output_error()).c_str(), all.mean_mass_recall(),
                       all.needle_hit_rate(), all.mean_budget(), seconds_since(t0));
        }
      }
    }

    // Markdown: every system and budget over all heads, then per head kind.
    std::ostringstream md;
    md << "| system | avg budget | budget used | output rel. L2 | LSE error | mass recall | needle hit | replay match |\n"
       << "|---|---|---|---|---|---|---|---|\n";
    for (const auto& [k, m] : results)
      if (k.kind == -1)
        md << "| " << k.system << " | " << fmt(k.budget, 2) << " | " << fmt(m.mean_budget()) << " | "
           << fmt(m.mean_output_error()) << " | " << fmt(m.mean_lse_error()) << " | " << fmt(m.mean_mass_recall()) << " | "
           << fmt(m.needle_hit_rate(), 3) << " | " << fmt(m.replay_match_rate(), 3) << " |\n";
    md << "\nPer head kind:\n\n| system | avg budget | kind | budget used | output rel. L2 | mass recall | needle hit |\n"
       << "|---|---|---|---|---|---|---|\n";
    for (const auto& [k, m] : results)
      if (k.kind >= 0)
        md << "| " << k.system << " | " << fmt(k.budget, 2) << " | " << kind_name(k.kind) << " | " << fmt(m.mean_budget())
           << " | " << fmt(m.mean_output_error()) << " | " << fmt(m.mean_mass_recall()) << " | "
           << fmt(m.needle_hit_rate(), 3) << " |\n";
    std::cout << md.str();
    if (!o.md.empty()) {
      std::ofstream f(o.md);
      f << md.str();
    }

    // Figures at an average budget of 5% (the fixed baseline's budget), over every context.
    auto find = [&](const std::string& sys, double b, int kind) -> const MetricSums* {
      auto it = results.find(Key{sys, b, kind});
      return it == results.end() ? nullptr : &it->second;
    };
    std::ostringstream ctx;
    for (std::size_t i = 0; i < o.contexts.size(); ++i) ctx << (i ? ", " : "") << o.contexts[i];
    const std::string setting = detail::concat(o.model, " zoo, ", o.layers, " layers spread over the model, contexts {",
                                               ctx.str(), "} tokens, batch 1, ", o.steps, " measured decode steps after ",
                                               o.warmup, " warm-up, seed ", o.seed, ", ", o.gpu ? "GPU" : "CPU", " backend");
    // Per head kind, so a figure over every head can be read against what each kind allows.
    auto per_kind = [&](const std::string& sys, double b, auto metric) {
      std::string out = "per kind:";
      for (int k = 0; k < zoo::kHeadKinds; ++k)
        if (const MetricSums* m = find(sys, b, k)) out += detail::concat(" ", kind_name(k), " ", fmt(metric(*m)));
      return out;
    };
    std::vector<eval::Figure> figures;
    const MetricSums* flux5 = find("fluxion", 0.05, -1);
    const MetricSums* fixed5 = find("fixed", 0.05, -1);
    const MetricSums* oracle5 = find("oracle", 0.05, -1);
    const MetricSums* flux5_ret = find("fluxion", 0.05, static_cast<int>(HeadKind::kRetrieval));
    if (flux5) {
      figures.push_back({"mass_recall_avg_budget_5pct", flux5->mean_mass_recall(), "share of exact softmax mass",
                         detail::concat("Fluxion default (OnlineHeadProfile+OutputAware+Priority) at avg_budget 0.05 (used ",
                                        fmt(flux5->mean_budget()), "): mean over query heads of the exact softmax mass ",
                                        "of the pages it selected (selection replayed with the CPU selection kernels ",
                                        "under the plan's rules; replayed count matched StepStats for ",
                                        fmt(100 * flux5->replay_match_rate(), 1), "% of segments); ",
                                        per_kind("fluxion", 0.05, [](const MetricSums& m) { return m.mean_mass_recall(); }),
                                        "; FixedBudget(0.05) over every head: ", fixed5 ? fmt(fixed5->mean_mass_recall()) : "-",
                                        "; ceiling of any page selection at this average budget (oracle: exact page ",
                                        "masses, budget shared across each layer's heads): ",
                                        oracle5 ? fmt(oracle5->mean_mass_recall()) : "not run", " (",
                                        per_kind("oracle", 0.05, [](const MetricSums& m) { return m.mean_mass_recall(); }),
                                        "); ", setting)});
    }
    if (flux5_ret) {
      figures.push_back({"needle_hit_rate", flux5_ret->needle_hit_rate(), "share of needles",
                         detail::concat("Fluxion default at avg_budget 0.05: share of (step, retrieval head) where every ",
                                        "page of the needle the query looks for was selected (",
                                        flux5_ret->needle_hits, " of ", flux5_ret->needles, "); ", setting)});
    }
    if (flux5 && fixed5) {
      figures.push_back({"output_error_vs_fixed5",
                         fixed5->mean_output_error() > 0 ? flux5->mean_output_error() / fixed5->mean_output_error() : 0,
                         "ratio",
                         detail::concat("mean output relative L2 error vs exact attention (double): Fluxion default ",
                                        fmt(flux5->mean_output_error()), " (budget used ", fmt(flux5->mean_budget()),
                                        ") / FixedBudget(0.05)+HybridGenFeedback ", fmt(fixed5->mean_output_error()),
                                        " (budget used ", fmt(fixed5->mean_budget()), "), both at avg_budget 0.05; Fluxion ",
                                        per_kind("fluxion", 0.05, [](const MetricSums& m) { return m.mean_output_error(); }),
                                        "; fixed ", per_kind("fixed", 0.05, [](const MetricSums& m) { return m.mean_output_error(); }),
                                        "; ", setting)});
    }
    std::ostringstream rows;
    rows << "[";
    bool first = true;
    for (const auto& [k, m] : results) {
      rows << (first ? "\n    " : ",\n    ") << "{\"system\": " << eval::json_string(k.system)
           << ", \"avg_budget\": " << eval::json_number(k.budget) << ", \"kind\": " << eval::json_string(kind_name(k.kind))
           << ", \"budget_used\": " << eval::json_number(m.mean_budget())
           << ", \"output_rel_l2\": " << (m.has_output ? eval::json_number(m.mean_output_error()) : "null")
           << ", \"lse_error\": " << eval::json_number(m.mean_lse_error())
           << ", \"mass_recall\": " << eval::json_number(m.mean_mass_recall())
           << ", \"needle_hit_rate\": " << (m.needles ? eval::json_number(m.needle_hit_rate()) : "null")
           << ", \"replay_match\": " << eval::json_number(m.replay_match_rate())
           << ", \"samples\": " << m.q_samples << "}";
      first = false;
    }
    rows << "\n  ]";
    std::ostringstream systems;
    systems << "{";
    for (std::size_t i = 0; i < kSystems.size(); ++i)
      systems << (i ? ", " : "") << eval::json_string(kSystems[i].name) << ": " << eval::json_string(kSystems[i].what);
    systems << "}";
    std::string device = eval::cpu_model_name() + " (CPU backend)";
#if HATTN_WITH_CUDA
    if (o.gpu) {
      cudaDeviceProp prop{};
      if (cudaGetDeviceProperties(&prop, 0) == cudaSuccess) device = std::string(prop.name) + " + " + eval::cpu_model_name();
    }
#endif
    eval::write_results(o.json, device, eval::commit_or_env(o.commit), figures,
                        {{"setting", eval::json_string(setting)}, {"systems", systems.str()}, {"rows", rows.str()}});
    std::fprintf(stderr, "[eval] wrote %s in %.1f s total\n", o.json.c_str(), seconds_since(t_start));
  } catch (const std::exception& e) {
    std::cerr << "hattn-eval: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
