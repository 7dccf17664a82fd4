// epx-moe-layer's pieces besides the epx calls: its command line (options, defaults and limits,
// a strict parser: an unknown option, a missing value or a value out of range is a UsageError),
// and the toy MoE model (router, experts, the dense computation the layer is checked against).
#pragma once

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

// The toy mixture-of-experts layer that epx-moe-layer runs through epx, in plain C++ on the
// host: deterministic inputs, a router, the experts' forward and backward, and the whole layer
// computed densely (every token through its top-k experts in one process, no exchange), which
// the example holds epx's results against. Nothing here uses epx.
namespace toy {

// bf16 values travel as their 16-bit patterns (epx::DType::kBFloat16): the upper half of an
// IEEE float, rounded to nearest even. The toy's values are finite, so NaN needs no care.
inline uint16_t to_bf16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  bits += 0x7fff + ((bits >> 16) & 1);
  return uint16_t(bits >> 16);
}

inline float from_bf16(uint16_t value) {
  const uint32_t bits = uint32_t(value) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

inline std::vector<float> from_bf16(const std::vector<uint16_t>& values) {
  std::vector<float> out(values.size());
  std::transform(values.begin(), values.end(), out.begin(),
                 [](uint16_t v) { return from_bf16(v); });
  return out;
}

// A value in [-1, 1) that depends on its arguments alone (a splitmix64 hash of them): every
// process derives the same router and each rank's data without sharing any state.
inline float noise(uint64_t stream, uint64_t i, uint64_t j) {
  uint64_t z = stream * 0x9e3779b97f4a7c15ull + i * 0xd1b54a32d192ed03ull + j;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return float(z >> 40) / float(1 << 23) - 1.0f;  // 24 random bits scaled to [0, 2), less 1
}

enum Stream : uint64_t { kTokens = 1, kOutputGrads = 2, kRouter = 3 };

struct Shape {
  int64_t hidden = 0;
  int32_t num_experts = 0;
  int32_t num_topk = 0;
};

// Rows [count, hidden] of bf16 noise for `rank`: its tokens x (kTokens), or the gradient of the
// loss with respect to its layer outputs, dL/dy (kOutputGrads).
inline std::vector<uint16_t> rows(Stream stream, int rank, int64_t count, int64_t hidden) {
  std::vector<uint16_t> out(size_t(count * hidden));
  for (int64_t t = 0; t < count; ++t) {
    for (int64_t h = 0; h < hidden; ++h) {
      out[t * hidden + h] = to_bf16(noise(stream, (uint64_t(rank) << 32) + uint64_t(t), h));
    }
  }
  return out;
}

struct Routing {
  std::vector<int32_t> topk_idx;  // [S, K]: each token's experts, best first
  std::vector<float> weights;     // [S, K]: a softmax over those K scores
};

// The router: scores = x P / sqrt(H) with a fixed pseudo-random projection P [H, E], each
// token's K best experts (ties to the lower index) and a softmax over their scores.
inline Routing route(const std::vector<uint16_t>& x, int64_t count, const Shape& shape) {
  const int64_t H = shape.hidden;
  const int32_t E = shape.num_experts, K = shape.num_topk;
  Routing routing{std::vector<int32_t>(size_t(count * K)), std::vector<float>(size_t(count * K))};
  std::vector<float> scores(static_cast<size_t>(E));
  std::vector<int32_t> order(static_cast<size_t>(E));
  for (int64_t t = 0; t < count; ++t) {
    for (int32_t e = 0; e < E; ++e) {
      float score = 0;
      for (int64_t h = 0; h < H; ++h) score += from_bf16(x[t * H + h]) * noise(kRouter, h, e);
      scores[e] = score / std::sqrt(float(H));
    }
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + K, order.end(), [&](int32_t a, int32_t b) {
      return scores[a] > scores[b] || (scores[a] == scores[b] && a < b);
    });
    float sum = 0;
    for (int32_t k = 0; k < K; ++k) {
      // Less the best score, so that exp cannot overflow.
      const float w = std::exp(scores[order[k]] - scores[order[0]]);
      routing.topk_idx[t * K + k] = order[k];
      routing.weights[t * K + k] = w;
      sum += w;
    }
    for (int32_t k = 0; k < K; ++k) routing.weights[t * K + k] /= sum;
  }
  return routing;
}

// Expert e computes h = x * scale + bias on each of its rows, so its backward is
// dL/dx = dL/dh * scale.
struct Expert {
  float scale, bias;
};

inline Expert expert(int32_t global_expert) {
  return {0.5f + 0.125f * float(global_expert % 9), 0.0625f * float(global_expert % 5) - 0.125f};
}

// A value of the dense layer and the sum of its terms' magnitudes: a sum that cancels to near
// zero is judged against the size of what went into it, not against its own.
struct Reference {
  std::vector<double> value, magnitude;
};

struct DenseLayer {
  Reference y;   // [S, H]: y[t] = sum_k w[t,k] * expert_k(x[t])
  Reference dx;  // [S, H]: dL/dx[t] = sum_k w[t,k] * scale_k * dL/dy[t]
  Reference dw;  // [S, K]: dL/dw[t,k] = dot(dL/dy[t], expert_k(x[t]))
};

// The layer on one rank's tokens, in double, with no exchange: each token through its experts.
inline DenseLayer dense_layer(const std::vector<uint16_t>& x, const Routing& routing,
                              const std::vector<uint16_t>& dy, int64_t count, const Shape& shape) {
  const int64_t H = shape.hidden, K = shape.num_topk;
  auto sized = [](int64_t n) {
    return Reference{std::vector<double>(size_t(n)), std::vector<double>(size_t(n))};
  };
  DenseLayer dense{sized(count * H), sized(count * H), sized(count * K)};
  for (int64_t t = 0; t < count; ++t) {
    for (int64_t k = 0; k < K; ++k) {
      const Expert ex = expert(routing.topk_idx[t * K + k]);
      const double w = routing.weights[t * K + k];
      for (int64_t h = 0; h < H; ++h) {
        const int64_t i = t * H + h;
        const double out = double(from_bf16(x[i])) * ex.scale + ex.bias;
        const double grad = from_bf16(dy[i]);
        dense.y.value[i] += w * out;
        dense.y.magnitude[i] += std::abs(w * out);
        dense.dx.value[i] += w * ex.scale * grad;
        dense.dx.magnitude[i] += std::abs(w * ex.scale * grad);
        dense.dw.value[t * K + k] += grad * out;
        dense.dw.magnitude[t * K + k] += std::abs(grad * out);
      }
    }
  }
  return dense;
}

// The largest error of `got` against `want`, each relative to its magnitude.
inline double max_error(const std::vector<float>& got, const Reference& want) {
  double worst = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double error = std::abs(double(got[i]) - want.value[i]);
    worst = std::max(worst, error / std::max(want.magnitude[i], 1e-30));
  }
  return worst;
}

}  // namespace toy

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

// The command-line walk both this example and tests/check/moe_check.cpp use: --help / -h set
// `help`; every other option goes to `handle(option, value)`, where value() takes the option's
// argument (a UsageError when there is none), and `handle` returns false for an option it does
// not know (a UsageError too).
template <typename Handler>
void for_each_option(int argc, char** argv, bool& help, Handler&& handle) {
  for (int i = 1; i < argc; ++i) {
    const std::string option = argv[i];
    if (option == "--help" || option == "-h") {
      help = true;
      continue;
    }
    auto value = [&] {
      if (i + 1 >= argc) throw UsageError(option + " needs a value");
      return argv[++i];
    };
    if (!handle(option, value)) throw UsageError("unknown option " + option);
  }
}

// --transport's value: auto, host or cuda.
inline std::string parse_transport(const char* text) {
  const std::string transport = text;
  if (transport != "auto" && transport != "host" && transport != "cuda") {
    throw UsageError("--transport takes auto, host or cuda, not '" + transport + "'");
  }
  return transport;
}

inline Options parse(int argc, char** argv) {
  Options o;
  for_each_option(argc, argv, o.help, [&](const std::string& option, auto value) {
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
      o.transport = parse_transport(value());
    } else {
      return false;
    }
    return true;
  });
  if (o.topk > o.experts) {
    throw UsageError("--topk " + std::to_string(o.topk) + " exceeds --experts " +
                     std::to_string(o.experts));
  }
  return o;
}

}  // namespace moe_layer
