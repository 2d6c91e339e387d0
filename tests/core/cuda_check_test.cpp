// The checked CUDA call helper reports the expression, file, line and CUDA's own error string. Needs
// the CUDA runtime library but no device: error strings are available without one.
#include <gtest/gtest.h>

#include <string>

#include "hattn/core/cuda_check.hpp"

namespace hattn {
namespace {

TEST(CudaCheck, SuccessIsSilentAndFailureNamesFileLineAndError) {
  EXPECT_NO_THROW(HATTN_CUDA_CHECK(cudaSuccess));
  std::string msg;
  const int line = __LINE__ + 2;
  try {
    HATTN_CUDA_CHECK(cudaErrorInvalidValue);
  } catch (const CudaError& e) {
    msg = e.what();
  }
  EXPECT_NE(msg.find("cuda_check_test.cpp:" + std::to_string(line)), std::string::npos) << msg;
  EXPECT_NE(msg.find("cudaErrorInvalidValue"), std::string::npos) << msg;
  EXPECT_NE(msg.find(cudaGetErrorString(cudaErrorInvalidValue)), std::string::npos) << msg;
  EXPECT_NE(msg.find("cudaErrorInvalidValue failed: "), std::string::npos) << "quotes the expression: " << msg;
}

}  // namespace
}  // namespace hattn
