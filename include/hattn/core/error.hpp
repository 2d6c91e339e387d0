#pragma once
// The one exception family of the SDK, and the helpers that build messages naming the argument.
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
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

/// A name or value of a require() message: a callable (a lambda that formats it) is called only when
/// the message is built, anything else is streamed as it is.
template <class Part>
decltype(auto) message_part(const Part& part) {
  if constexpr (std::is_invocable_v<const Part&>) return part();
  else return (part);
}

/// Throws InvalidArgument "<where>: <name> must be <expected...> (got <value>)" unless ok. Nothing of
/// the message is built unless the check fails: the expectation comes in parts, and a name or value
/// that needs formatting comes as a lambda. Checks inside per-page and per-item loops cost one
/// comparison (a message built eagerly cost ~0.3 us per check, most of the CPU side's time in a step).
template <class Name, class Value, class... Expected>
void require(bool ok, const char* where, const Name& name, const Value& value, const Expected&... expected) {
  if (!ok) [[unlikely]]
    throw InvalidArgument(
        concat(where, ": ", message_part(name), " must be ", expected..., " (got ", message_part(value), ")"));
}

}  // namespace detail
}  // namespace hattn
