#include "hattn/kv/paged_kv_store.hpp"

#include <algorithm>
#include <cstring>
#include <limits>
#include <type_traits>

namespace hattn {

PagedKVStore::PagedKVStore(const ModelShape& shape, int page_size, std::size_t pool_bytes, HostMemoryRequest request)
    : shape_((shape.validate(), shape)),
      pool_(PageLayout{page_size, shape.kv_heads, shape.head_dim, shape.kv_dtype}, pool_bytes, request) {}

SeqId PagedKVStore::add_sequence() {
  std::lock_guard lock(mutex_);
  auto s = std::make_unique<Sequence>();
  s->layers.resize(static_cast<std::size_t>(shape_.layers));
  const SeqId id = next_id_++;
  sequences_.emplace(id, std::move(s));
  return id;
}

const PagedKVStore::Sequence& PagedKVStore::find(SeqId seq, const char* where) const {
  std::lock_guard lock(mutex_);
  auto it = sequences_.find(seq);
  detail::require(it != sequences_.end(), where, "seq", seq, "a live sequence id");
  return *it->second;
}

PagedKVStore::Sequence& PagedKVStore::find(SeqId seq, const char* where) {
  return const_cast<Sequence&>(std::as_const(*this).find(seq, where));
}

void PagedKVStore::check_layer(int layer, const char* where) const {
  detail::require(layer >= 0 && layer < shape_.layers, where, "layer", layer,
                  "in [0, ", shape_.layers, ")");
}

bool PagedKVStore::contains(SeqId seq) const {
  std::lock_guard lock(mutex_);
  return sequences_.count(seq) != 0;
}

std::vector<SeqId> PagedKVStore::sequences() const {
  std::lock_guard lock(mutex_);
  std::vector<SeqId> out;
  out.reserve(sequences_.size());
  for (const auto& [id, s] : sequences_) out.push_back(id);
  std::sort(out.begin(), out.end());
  return out;
}

std::int64_t PagedKVStore::length(SeqId seq, int layer) const {
  check_layer(layer, "PagedKVStore::length");
  return find(seq, "PagedKVStore::length").layers[layer].length;
}

int PagedKVStore::last_page_tokens(SeqId seq, int layer) const {
  check_layer(layer, "PagedKVStore::last_page_tokens");
  const auto& l = find(seq, "PagedKVStore::last_page_tokens").layers[layer];
  if (l.pages.empty()) return 0;
  return static_cast<int>(l.length - static_cast<std::int64_t>(l.pages.size() - 1) * pool_.layout().page_size);
}

std::span<const PageId> PagedKVStore::pages(SeqId seq, int layer) const {
  check_layer(layer, "PagedKVStore::pages");
  return find(seq, "PagedKVStore::pages").layers[layer].pages;
}

std::span<const float> PagedKVStore::group_summaries(SeqId seq, int layer) const {
  check_layer(layer, "PagedKVStore::group_summaries");
  return find(seq, "PagedKVStore::group_summaries").layers[layer].groups;
}

void PagedKVStore::append(SeqId seq, int layer, const TensorView& keys, const TensorView& values) {
  constexpr const char* kWhere = "PagedKVStore::append";
  check_layer(layer, kWhere);
  Sequence& s = find(seq, kWhere);
  const PageLayout& layout = pool_.layout();
  const std::int64_t n = keys.rank > 0 ? keys.shape[0] : -1;
  detail::require_tensor(keys, kWhere, "keys", layout.dtype, {-1, layout.kv_heads, layout.head_dim});
  detail::require_tensor(values, kWhere, "values", layout.dtype, {n, layout.kv_heads, layout.head_dim});
  detail::require(keys.device == Device::kHost, kWhere, "keys.device", to_string(keys.device), "host");
  detail::require(values.device == Device::kHost, kWhere, "values.device", to_string(values.device), "host");
  if (n == 0) return;

  LayerTable& table = s.layers[layer];
  const std::int64_t ps = layout.page_size;
  const std::int64_t new_length = table.length + n;
  const std::int64_t pages_needed = (new_length + ps - 1) / ps - static_cast<std::int64_t>(table.pages.size());
  const std::int64_t groups_after = ((new_length + ps - 1) / ps + kPagesPerSummaryGroup - 1) / kPagesPerSummaryGroup;
  // Every allocation happens before the first write, so a failure leaves the sequence as it was.
  const std::size_t stride = layout.summary_elems();
  const std::size_t row_elems = static_cast<std::size_t>(layout.kv_heads) * layout.head_dim;
  table.pages.reserve(table.pages.size() + static_cast<std::size_t>(pages_needed));
  table.groups.reserve(static_cast<std::size_t>(groups_after) * stride);
  table.page_min.resize(row_elems);
  table.page_max.resize(row_elems);
  table.page_sum.resize(row_elems);
  table.group_sum.resize(row_elems);
  std::vector<PageId> fresh;
  try {
    fresh = pool_.allocate(pages_needed);
  } catch (const OutOfCapacity& e) {
    // Say which append failed; the pool's message says how short it was.
    throw OutOfCapacity(detail::concat(kWhere, "(seq ", seq, ", layer ", layer, ", ", n, " tokens at length ",
                                       table.length, "): ", e.what()));
  }
  table.pages.insert(table.pages.end(), fresh.begin(), fresh.end());
  table.groups.resize(static_cast<std::size_t>(groups_after) * stride);

  const std::size_t elem = dtype_bytes(layout.dtype);
  const std::size_t row_bytes = static_cast<std::size_t>(layout.head_dim) * elem;
  const auto* k_src = static_cast<const std::byte*>(keys.data);
  const auto* v_src = static_cast<const std::byte*>(values.data);
  for (std::int64_t i = 0; i < n; ++i) {
    const std::int64_t pos = table.length + i;
    std::byte* page = pool_.page(table.pages[pos / ps]);
    const int tok = static_cast<int>(pos % ps);
    for (int h = 0; h < layout.kv_heads; ++h) {
      const std::size_t src = (static_cast<std::size_t>(i) * layout.kv_heads + h) * row_bytes;
      std::memcpy(page + layout.key_offset(h, tok) * elem, k_src + src, row_bytes);
      std::memcpy(page + layout.value_offset(h, tok) * elem, v_src + src, row_bytes);
    }
  }
  switch (layout.dtype) {
    case DType::kFloat32: update_summaries<float>(table, static_cast<const float*>(keys.data), n); break;
    case DType::kFloat16: update_summaries<half_t>(table, static_cast<const half_t*>(keys.data), n); break;
    case DType::kBFloat16: update_summaries<bfloat16_t>(table, static_cast<const bfloat16_t*>(keys.data), n); break;
  }
  table.length = new_length;
}

namespace {

template <class T>
T narrow(float v) noexcept {
  if constexpr (std::is_same_v<T, float>) return v;
  else if constexpr (std::is_same_v<T, half_t>) return to_half(v);
  else return to_bfloat16(v);
}

// One key row of one head folded into the running page and group state. Separate restrict-qualified
// arrays let the compiler vectorise (minps/maxps keep std::min's operand order, so results match the
// scalar definition bit for bit).
template <class T>
void accumulate(const T* __restrict key, int dim, float* __restrict pmin, float* __restrict pmax,
                float* __restrict psum, float* __restrict glo, float* __restrict ghi, double* __restrict gsum) {
  for (int d = 0; d < dim; ++d) {
    const float k = to_float(key[d]);
    pmin[d] = std::min(pmin[d], k);
    pmax[d] = std::max(pmax[d], k);
    psum[d] += k;
    glo[d] = std::min(glo[d], k);
    ghi[d] = std::max(ghi[d], k);
    gsum[d] += k;
  }
}

template <class T>
void publish_page(int dim, const float* __restrict pmin, const float* __restrict pmax, const float* __restrict psum,
                  float tokens, T* __restrict out_min, T* __restrict out_max, T* __restrict out_mean) {
  for (int d = 0; d < dim; ++d) {
    out_min[d] = narrow<T>(pmin[d]);
    out_max[d] = narrow<T>(pmax[d]);
    out_mean[d] = narrow<T>(psum[d] / tokens);  // a division, not a reciprocal: same bits as from scratch
  }
}

}  // namespace

// Folds n new keys ([n][kv_heads][head_dim], starting at position table.length) into the running
// state of the last page and the last coarse group, and publishes both after each page/group or at
// the end of the append. The running page state is the same fp32 min/max/sum in token order that
// compute_page_summary() computes from scratch, so both give identical bits; an append costs
// O(new tokens), not O(page_size) or O(group size).
template <class T>
void PagedKVStore::update_summaries(LayerTable& table, const T* keys, std::int64_t n) {
  const PageLayout& layout = pool_.layout();
  const std::int64_t ps = layout.page_size;
  const std::int64_t group_tokens = ps * kPagesPerSummaryGroup;
  const int dim = layout.head_dim;
  const std::size_t row_elems = static_cast<std::size_t>(layout.kv_heads) * dim;
  float* pmin = table.page_min.data();
  float* pmax = table.page_max.data();
  float* psum = table.page_sum.data();
  double* gsum = table.group_sum.data();
  for (std::int64_t i = 0; i < n; ++i) {
    const std::int64_t pos = table.length + i;
    const std::int64_t group = pos / group_tokens;
    float* g = table.groups.data() + static_cast<std::size_t>(group) * layout.summary_elems();
    if (pos % ps == 0) {
      std::fill(pmin, pmin + row_elems, std::numeric_limits<float>::infinity());
      std::fill(pmax, pmax + row_elems, -std::numeric_limits<float>::infinity());
      std::fill(psum, psum + row_elems, 0.0f);
    }
    if (pos % group_tokens == 0) {
      for (int h = 0; h < layout.kv_heads; ++h) {
        std::fill_n(g + layout.summary_offset(h, 0), dim, std::numeric_limits<float>::infinity());
        std::fill_n(g + layout.summary_offset(h, 1), dim, -std::numeric_limits<float>::infinity());
      }
      std::fill(gsum, gsum + row_elems, 0.0);
    }
    const T* row = keys + static_cast<std::size_t>(i) * row_elems;
    for (int h = 0; h < layout.kv_heads; ++h) {
      const std::size_t base = static_cast<std::size_t>(h) * dim;
      accumulate(row + base, dim, pmin + base, pmax + base, psum + base, g + layout.summary_offset(h, 0),
                 g + layout.summary_offset(h, 1), gsum + base);
    }
    const bool last = i == n - 1;
    if (last || pos % ps == ps - 1) {
      const auto tokens = static_cast<float>(pos % ps + 1);
      T* out = reinterpret_cast<T*>(pool_.summary(table.pages[pos / ps]));
      for (int h = 0; h < layout.kv_heads; ++h) {
        const std::size_t base = static_cast<std::size_t>(h) * dim;
        publish_page(dim, pmin + base, pmax + base, psum + base, tokens, out + layout.summary_offset(h, 0),
                     out + layout.summary_offset(h, 1), out + layout.summary_offset(h, 2));
      }
    }
    if (last || pos % group_tokens == group_tokens - 1) {
      const auto tokens = static_cast<double>(pos % group_tokens + 1);
      for (int h = 0; h < layout.kv_heads; ++h) {
        float* gmean = g + layout.summary_offset(h, 2);
        const double* sum = gsum + static_cast<std::size_t>(h) * dim;
        for (int d = 0; d < dim; ++d) gmean[d] = static_cast<float>(sum[d] / tokens);
      }
    }
  }
}

void PagedKVStore::read(SeqId seq, int layer, std::int64_t begin, std::int64_t n, const TensorView& keys_out,
                        const TensorView& values_out) const {
  constexpr const char* kWhere = "PagedKVStore::read";
  check_layer(layer, kWhere);
  const LayerTable& table = find(seq, kWhere).layers[layer];
  const PageLayout& layout = pool_.layout();
  detail::require(begin >= 0 && n >= 0 && begin + n <= table.length, kWhere, "token range",
                  [&] { return detail::concat("[", begin, ", ", begin + n, ")"); }, "inside [0, ", table.length, ")");
  detail::require_tensor(keys_out, kWhere, "keys_out", layout.dtype, {n, layout.kv_heads, layout.head_dim});
  detail::require_tensor(values_out, kWhere, "values_out", layout.dtype, {n, layout.kv_heads, layout.head_dim});
  const std::size_t elem = dtype_bytes(layout.dtype);
  const std::size_t row_bytes = static_cast<std::size_t>(layout.head_dim) * elem;
  auto* k_dst = static_cast<std::byte*>(keys_out.data);
  auto* v_dst = static_cast<std::byte*>(values_out.data);
  for (std::int64_t i = 0; i < n; ++i) {
    const std::int64_t pos = begin + i;
    const std::byte* page = pool_.page(table.pages[pos / layout.page_size]);
    const int tok = static_cast<int>(pos % layout.page_size);
    for (int h = 0; h < layout.kv_heads; ++h) {
      const std::size_t dst = (static_cast<std::size_t>(i) * layout.kv_heads + h) * row_bytes;
      std::memcpy(k_dst + dst, page + layout.key_offset(h, tok) * elem, row_bytes);
      std::memcpy(v_dst + dst, page + layout.value_offset(h, tok) * elem, row_bytes);
    }
  }
}

void PagedKVStore::release(SeqId seq) {
  std::unique_ptr<Sequence> s;
  {
    std::lock_guard lock(mutex_);
    auto it = sequences_.find(seq);
    detail::require(it != sequences_.end(), "PagedKVStore::release", "seq", seq, "a live sequence id");
    s = std::move(it->second);
    sequences_.erase(it);
  }
  for (const LayerTable& t : s->layers) pool_.free(t.pages);
}

}  // namespace hattn
