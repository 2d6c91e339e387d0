// The stream-side wait for a host-written counter: later work on the stream holds until the host
// publishes the value, and runs at once when it is already there (wrapping 32-bit comparison).
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <thread>

#include "cuda_test_support.hpp"
#include "hattn/kernels/cuda_host_wait.hpp"

namespace hattn::test {
namespace {

// A mapped word the host publishes values into, as the engine's driver thread does.
class MappedWord {
 public:
  explicit MappedWord(std::uint32_t v) : word_({v}) {}
  void set(std::uint32_t v) { std::atomic_ref<std::uint32_t>(*word_.get()).store(v, std::memory_order_release); }
  const std::uint32_t* get() const { return word_.get(); }

 private:
  MappedBuffer<std::uint32_t> word_;
};

class Stream {
 public:
  Stream() { HATTN_CUDA_CHECK(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking)); }
  ~Stream() { cudaStreamDestroy(s_); }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  cudaStream_t get() const { return s_; }
  cuda::Stream handle() const { return reinterpret_cast<cuda::Stream>(s_); }

 private:
  cudaStream_t s_ = nullptr;
};

// A copy after the wait marks whether the stream got past it.
void enqueue_marker(DeviceBuffer<int>& marker, const Stream& s) {
  HATTN_CUDA_CHECK(cudaMemsetAsync(marker.get(), 0, sizeof(int), s.get()));
}

bool still_waiting(const Stream& s) {
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  const cudaError_t e = cudaStreamQuery(s.get());
  if (e == cudaErrorNotReady) return true;
  HATTN_CUDA_CHECK(e);
  return false;
}

TEST(CudaHostWait, HoldsTheStreamUntilTheHostPublishesTheValue) {
  HATTN_REQUIRE_CUDA_DEVICE();
  MappedWord word(5);
  Stream s;
  DeviceBuffer<int> marker(1);
  HATTN_CUDA_CHECK(cudaDeviceSynchronize());  // the buffer's 0xff fill is done before the wait starts
  cuda::launch_wait_host_value(word.get(), 7, s.handle());
  enqueue_marker(marker, s);
  EXPECT_TRUE(still_waiting(s));
  word.set(6);  // not yet
  EXPECT_TRUE(still_waiting(s));
  EXPECT_EQ(marker.download()[0], -1);  // the marker has not run (the buffer starts as 0xff bytes)
  word.set(7);
  HATTN_CUDA_CHECK(cudaStreamSynchronize(s.get()));
  EXPECT_EQ(marker.download()[0], 0);
}

TEST(CudaHostWait, PassesAValueAlreadyReachedAndComparesAcrossTheWrap) {
  HATTN_REQUIRE_CUDA_DEVICE();
  Stream s;
  {
    MappedWord word(10);
    cuda::launch_wait_host_value(word.get(), 9, s.handle());
    cuda::launch_wait_host_value(word.get(), 10, s.handle());
    HATTN_CUDA_CHECK(cudaStreamSynchronize(s.get()));
  }
  MappedWord word(0xfffffff0u);
  DeviceBuffer<int> marker(1);
  HATTN_CUDA_CHECK(cudaDeviceSynchronize());
  cuda::launch_wait_host_value(word.get(), 3u, s.handle());  // 19 counts ahead, past the wrap
  enqueue_marker(marker, s);
  EXPECT_TRUE(still_waiting(s));
  word.set(0xffffffffu);
  EXPECT_TRUE(still_waiting(s));
  word.set(3u);
  HATTN_CUDA_CHECK(cudaStreamSynchronize(s.get()));
  EXPECT_EQ(marker.download()[0], 0);
}

TEST(CudaHostWait, NamesANullWord) {
  HATTN_REQUIRE_CUDA_DEVICE();
  expect_named([] { cuda::launch_wait_host_value(nullptr, 1, nullptr); }, "word");
}

}  // namespace
}  // namespace hattn::test
