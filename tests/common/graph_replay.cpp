#include "common/graph_replay.hpp"

#include <cuda_runtime.h>

#include <cstring>
#include <random>

#include "common/cuda_device_ops.hpp"
#include "common/random_problem.hpp"
#include "reference/reference.hpp"

namespace epx::testing {

RandomConfig graph_config(uint64_t seed, int num_ranks) {
  RandomConfig config = draw_config(seed, num_ranks);
  config.fp8 = false;
  config.expand = true;
  config.sync_counts = false;
  config.with_weights = true;
  config.with_aux = false;
  config.with_scalars = false;
  config.with_bias0 = config.with_bias1 = false;
  config.reduce_at_source = false;
  config.topk_int64 = true;
  return config;
}

std::string graph_replay_scenario(Buffer& buffer, const RandomConfig& config, int rank,
                                  void* stream_ptr, const DeviceOps& ops) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  const int num_ranks = buffer.num_ranks();
  const reference::Problem problem = config.problem();
  auto inputs = draw_dispatch_inputs(config);
  const int64_t tokens = inputs[rank].num_tokens, hidden = config.hidden, k = config.num_topk;
  auto x = ops.upload(inputs[rank].x.data(), inputs[rank].x.size());
  auto topk = ops.upload(inputs[rank].topk_idx.data(), inputs[rank].topk_idx.size() * 8);
  auto w = ops.upload(inputs[rank].weights.data(), inputs[rank].weights.size() * 4);
  DispatchInputs din;
  din.x = TensorView(x.get(), DType::kBFloat16, {tokens, hidden}, buffer.device());
  din.topk_idx = TensorView(topk.get(), DType::kInt64, {tokens, k}, buffer.device());
  din.weights = TensorView(w.get(), DType::kFloat32, {tokens, k}, buffer.device());
  DispatchOptions options;
  options.expand = true;
  options.expert_alignment = config.expert_alignment;
  options.sync_counts = false;

  // A warm-up outside the capture (collective, like every operation), then the capture, which
  // runs nothing (thread-local mode: other threads may keep issuing work meanwhile).
  (void)buffer.dispatch(din, options, stream);
  buffer.synchronize(stream);
  cudaGraph_t graph;
  check_cuda(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), "begin capture");
  DispatchResult recv = buffer.dispatch(din, options, stream);
  CombineInputs cin;
  cin.x = recv.x.view;  // combine the dispatched rows themselves, weighted
  cin.weights = recv.weights.view;
  CombineResult out = buffer.combine(cin, recv.handle, {}, stream);
  check_cuda(cudaStreamEndCapture(stream, &graph), "end capture");
  cudaGraphExec_t exec;
  check_cuda(cudaGraphInstantiate(&exec, graph, 0), "instantiate");

  std::string bad;
  for (int replay = 0; replay < 3 && bad.empty(); ++replay) {
    // Every rank draws the same new values for every rank (the reference needs them all).
    std::mt19937_64 rng(config.seed + 100 * replay);
    for (auto& in : inputs) {
      for (size_t i = 0; i + 1 < in.x.size(); i += 2) {
        const uint16_t bits = random_bf16(rng);
        std::memcpy(&in.x[i], &bits, 2);
      }
    }
    check_cuda(cudaMemcpyAsync(x.get(), inputs[rank].x.data(), inputs[rank].x.size(),
                          cudaMemcpyHostToDevice, stream),
          "new inputs");
    check_cuda(cudaGraphLaunch(exec, stream), "graph launch");
    buffer.synchronize(stream);
    const auto want = reference::dispatch(problem, inputs, true, config.expert_alignment, false);
    std::vector<reference::CombineRankInputs> cin_ref(num_ranks);
    for (int q = 0; q < num_ranks; ++q) {
      cin_ref[q].x.resize(want[q].x.size() / 2);
      std::memcpy(cin_ref[q].x.data(), want[q].x.data(), want[q].x.size());
      cin_ref[q].weights = want[q].weights;
    }
    const auto want_y = reference::combine(problem, inputs, want, true, cin_ref, false);
    std::vector<uint16_t> y(tokens * hidden);
    ops.download(y.data(), out.x.view.data, y.size() * 2);
    bad = first_mismatch(y.data(), want_y[rank].x.data(), 2, y.size(), "graph replay combine y");
    if (!bad.empty()) bad = "replay " + std::to_string(replay) + ": " + bad;
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  return bad;
}

}  // namespace epx::testing
