// epx-moe-layer's command line: its options, their defaults and limits, and a strict parser
// (an unknown option, a missing value or a value out of range is a UsageError). No epx here.
#pragma once

#include <charconv>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

namespace moe_layer {

inline constexpr const char* kUsage =
    "usage: epx-moe-layer [--ranks R] [--tokens S] [--hidden H] [--experts E] [--topk K]\n"
    "                     [--alignment A] [--transport auto|host|cuda] [--help]\n"
    "  --ranks R        processes, one rank each (default: one per GPU, or 4 on the host)\n"
    "  --tokens S       tokens of rank 0; rank r holds r fewer (default 64)\n"
    "  --hidden H       hidden size (default 128)\n"
    "  --experts E      experts, a multiple of R (rounded up if not; default 16)\n"
    "  --topk K         experts per token, at most E (default 4)\n"
    "  --alignment A    pad each expert's rows to a multiple of A (default 16)\n"
    "  --transport T    auto (the GPUs when epx has CUDA and they are visible, else host),\n"
    "                   host or cuda\n";

struct Options {
  int ranks = 0;  // 0: the default for the transport
  int64_t tokens = 64;
  int64_t hidden = 128;
  int32_t experts = 16;
  int32_t topk = 4;
  int32_t alignment = 16;
  std::string transport = "auto";
  bool help = false;
  bool cuda = false;  // the CUDA transport: settled from --transport and the GPUs visible
};

// A mistake on the command line: main prints it with the usage and exits with 2.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

template <typename T>
T parse_number(const std::string& option, const char* text, T min, T max) {
  T value{};
  const char* end = text + std::strlen(text);
  const auto [stop, status] = std::from_chars(text, end, value);
  if (status != std::errc() || stop != end || value < min || value > max) {
    throw UsageError(option + " takes an integer in [" + std::to_string(min) + ", " +
                     std::to_string(max) + "], not '" + text + "'");
  }
  return value;
}

inline Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string option = argv[i];
    if (option == "--help" || option == "-h") {
      o.help = true;
      continue;
    }
    auto value = [&] {
      if (i + 1 >= argc) throw UsageError(option + " needs a value");
      return argv[++i];
    };
    if (option == "--ranks") {
      o.ranks = parse_number(option, value(), 1, 64);
    } else if (option == "--tokens") {
      o.tokens = parse_number<int64_t>(option, value(), 1, 1 << 16);
    } else if (option == "--hidden") {
      o.hidden = parse_number<int64_t>(option, value(), 1, 1 << 14);
    } else if (option == "--experts") {
      o.experts = parse_number(option, value(), 1, 1 << 10);
    } else if (option == "--topk") {
      o.topk = parse_number(option, value(), 1, 64);
    } else if (option == "--alignment") {
      o.alignment = parse_number(option, value(), 1, 1 << 10);
    } else if (option == "--transport") {
      o.transport = value();
      if (o.transport != "auto" && o.transport != "host" && o.transport != "cuda") {
        throw UsageError("--transport takes auto, host or cuda, not '" + o.transport + "'");
      }
    } else {
      throw UsageError("unknown option " + option);
    }
  }
  if (o.topk > o.experts) {
    throw UsageError("--topk " + std::to_string(o.topk) + " exceeds --experts " +
                     std::to_string(o.experts));
  }
  return o;
}

}  // namespace moe_layer
