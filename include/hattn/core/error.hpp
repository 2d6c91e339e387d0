#pragma once
// The one exception family of the SDK, and the helpers that build messages naming the argument.
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace hattn {

/// Base of every exception the SDK throws. Set-up and plan-time calls throw it; run() never does
/// from inside a captured region.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// An argument was out of range or inconsistent (shape, dtype, page size, id, budget).
class InvalidArgument : public Error {
 public:
  using Error::Error;
};

/// A pool or cache has no room left. Nothing already stored was touched.
class OutOfCapacity : public Error {
 public:
  using Error::Error;
};

/// A CUDA runtime call failed; the message carries file, line and the CUDA error string.
class CudaError : public Error {
 public:
  using Error::Error;
};

namespace detail {

template <class... Parts>
std::string concat(const Parts&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  return os.str();
}

/// Throws InvalidArgument "<where>: <name> must be <expected> (got <value>)" unless ok.
template <class Value>
void require(bool ok, const char* where, const char* name, const Value& value, const char* expected) {
  if (!ok) throw InvalidArgument(concat(where, ": ", name, " must be ", expected, " (got ", value, ")"));
}

}  // namespace detail
}  // namespace hattn
