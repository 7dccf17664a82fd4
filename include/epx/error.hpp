// epx error policy: every failure is an epx::Error carrying a code, the failed check and the
// place it was raised. The library never calls exit() or relies on assert().
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace epx {

enum class ErrorCode {
  kInvalidArgument,  // wrong dtype, shape, device, contiguity, option combination
  kInvalidRouting,  // topk_idx outside [-1, num_experts) (detected on the data, possibly on a peer)
  kHandleMismatch,  // handle from another buffer, layout or rank count
  kTimeout,         // a peer never arrived: the message names rank, phase, expected and seen
  kTransport,       // shared memory, NCCL or CUDA call failed
  kOutOfMemory,     // the allocator could not provide an output
  kInternal,        // a broken invariant inside epx (a bug)
  kUnusable,        // the buffer failed earlier (a timeout, a dead peer) on this rank or a peer;
                    // every later call raises this: build a new Buffer on every rank
};

const char* to_string(ErrorCode code);

class Error : public std::runtime_error {
 public:
  Error(ErrorCode code, const std::string& message) : std::runtime_error(message), code_(code) {}
  ErrorCode code() const noexcept { return code_; }

 private:
  ErrorCode code_;
};

namespace detail {
[[noreturn]] void throw_error(ErrorCode code, const char* file, int line, const std::string& what);
}  // namespace detail

}  // namespace epx

// EPX_CHECK(cond, code, stream-expression): throws epx::Error(code, "<message> [check: cond at
// file:line]") when cond is false. The message is built only on failure.
#define EPX_CHECK(cond, code, msg)                                           \
  do {                                                                       \
    if (!(cond)) {                                                           \
      std::ostringstream epx_check_stream_;                                  \
      epx_check_stream_ << msg << " [check: " #cond "]";                     \
      ::epx::detail::throw_error(::epx::ErrorCode::code, __FILE__, __LINE__, \
                                 epx_check_stream_.str());                   \
    }                                                                        \
  } while (0)

#define EPX_FAIL(code, msg)                                                \
  do {                                                                     \
    std::ostringstream epx_fail_stream_;                                   \
    epx_fail_stream_ << msg;                                               \
    ::epx::detail::throw_error(::epx::ErrorCode::code, __FILE__, __LINE__, \
                               epx_fail_stream_.str());                    \
  } while (0)
