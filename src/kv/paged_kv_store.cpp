#include "hattn/kv/paged_kv_store.hpp"

#include <algorithm>
#include <cstring>

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
                  detail::concat("in [0, ", shape_.layers, ")").c_str());
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

std::span<const PageId> PagedKVStore::pages(SeqId seq, int layer) const {
  check_layer(layer, "PagedKVStore::pages");
  return find(seq, "PagedKVStore::pages").layers[layer].pages;
}

std::span<const float> PagedKVStore::group_summaries(SeqId seq, int layer) const {
  check_layer(layer, "PagedKVStore::group_summaries");
  return find(seq, "PagedKVStore::group_summaries").layers[layer].groups;
}

void PagedKVStore::refresh_group(LayerTable& table, std::int64_t group) const {
  const PageLayout& layout = pool_.layout();
  const std::int64_t first = group * kPagesPerSummaryGroup;
  const std::int64_t last = std::min<std::int64_t>(first + kPagesPerSummaryGroup, table.pages.size());
  std::vector<const std::byte*> summaries;
  std::vector<int> tokens;
  for (std::int64_t p = first; p < last; ++p) {
    summaries.push_back(pool_.summary(table.pages[p]));
    tokens.push_back(static_cast<int>(std::min<std::int64_t>(layout.page_size, table.length - p * layout.page_size)));
  }
  const std::size_t stride = layout.summary_elems();
  if (table.groups.size() < static_cast<std::size_t>(group + 1) * stride)
    table.groups.resize(static_cast<std::size_t>(group + 1) * stride);
  compute_group_summary(layout, summaries, tokens, table.groups.data() + group * stride);
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
  // All-or-nothing: the only failure after this line would be a bad_alloc of the page table itself.
  std::vector<PageId> fresh;
  try {
    fresh = pool_.allocate(pages_needed);
  } catch (const OutOfCapacity& e) {
    // Say which append failed; the pool's message says how short it was.
    throw OutOfCapacity(detail::concat(kWhere, "(seq ", seq, ", layer ", layer, ", ", n, " tokens at length ",
                                       table.length, "): ", e.what()));
  }
  table.pages.insert(table.pages.end(), fresh.begin(), fresh.end());

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
  const std::int64_t first_page = table.length / ps;
  table.length = new_length;
  const std::int64_t last_page = (new_length - 1) / ps;
  for (std::int64_t p = first_page; p <= last_page; ++p) {
    const int tokens = static_cast<int>(std::min<std::int64_t>(ps, new_length - p * ps));
    compute_page_summary(layout, pool_.page(table.pages[p]), tokens, pool_.summary(table.pages[p]));
  }
  for (std::int64_t g = first_page / kPagesPerSummaryGroup; g <= last_page / kPagesPerSummaryGroup; ++g)
    refresh_group(table, g);
}

void PagedKVStore::read(SeqId seq, int layer, std::int64_t begin, std::int64_t n, const TensorView& keys_out,
                        const TensorView& values_out) const {
  constexpr const char* kWhere = "PagedKVStore::read";
  check_layer(layer, kWhere);
  const LayerTable& table = find(seq, kWhere).layers[layer];
  const PageLayout& layout = pool_.layout();
  detail::require(begin >= 0 && n >= 0 && begin + n <= table.length, kWhere, "token range",
                  detail::concat("[", begin, ", ", begin + n, ")"),
                  detail::concat("inside [0, ", table.length, ")").c_str());
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
