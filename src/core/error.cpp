#include "epx/error.hpp"

namespace epx {

const char* to_string(ErrorCode code) {
  switch (code) {
    case ErrorCode::kInvalidArgument:
      return "invalid argument";
    case ErrorCode::kInvalidRouting:
      return "invalid routing";
    case ErrorCode::kHandleMismatch:
      return "handle mismatch";
    case ErrorCode::kTimeout:
      return "timeout";
    case ErrorCode::kTransport:
      return "transport error";
    case ErrorCode::kOutOfMemory:
      return "out of memory";
    case ErrorCode::kInternal:
      return "internal error";
    case ErrorCode::kUnusable:
      return "unusable buffer";
  }
  return "unknown error";
}

namespace detail {
void throw_error(ErrorCode code, const char* file, int line, const std::string& what) {
  std::ostringstream message;
  message << "epx " << to_string(code) << ": " << what << " (" << file << ":" << line << ")";
  throw Error(code, message.str());
}
}  // namespace detail

}  // namespace epx
