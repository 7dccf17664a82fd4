// The outputs of one operation, asked of the allocator in one call (Allocator::allocate_many).
// Each `add` names where a tensor goes; `pack` puts small tensors (handle arrays) into one
// block they share, so they cost one allocation between them (they come back as views of it).
#pragma once

#include <cstdint>
#include <vector>

#include "epx/buffer.hpp"
#include "epx/tensor.hpp"

namespace epx::detail {

class OutputBatch {
 public:
  // A tensor of its own.
  void add(Tensor* out, DType dtype, std::vector<int64_t> shape);
  // A tensor inside the shared block (256-byte aligned within it).
  void pack(Tensor* out, DType dtype, std::vector<int64_t> shape);
  // Asks for everything added since the last call in one allocate_many and fills the targets.
  void allocate(Allocator& allocator, Device device, void* stream);

 private:
  struct Item {
    Tensor* out;
    DType dtype;
    std::vector<int64_t> shape;
  };
  std::vector<Item> separate_;
  std::vector<Item> packed_;
};

// The outputs of a dispatch's receive, each a tensor of its own, at the handle's capacity
// (expanded: row_capacity rows; compact: recv_token_capacity rows): x, and x_scales, weights,
// aux, topk_idx where the inputs and the layout have them. Both transports ask for these.
void add_dispatch_outputs(OutputBatch& batch, DispatchResult& result, const Handle& handle,
                          const DispatchInputs& in, int64_t hidden, int32_t num_topk);

}  // namespace epx::detail
