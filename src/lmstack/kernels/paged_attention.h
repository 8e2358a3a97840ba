// The paged-attention decode step of paged_attention.cpp, for other kernels of this library
// (decode_step.cpp calls it once per layer, without the dispatcher in between).
#pragma once

#include <ATen/ATen.h>

namespace lmstack {

// q (B, T, H, D), k / v (B, T, KV, D) float32 views (last dim contiguous) of this step's tokens,
// before RoPE; cos / sin (B, T, rot) or undefined (no RoPE). Writes RoPE(k) and v into
// k_cache / v_cache (slots, KV, D) at each token's slot (position q_pos[b, t] through
// block_tables; -1: padding, not written), then returns the attention of RoPE(q) over each
// row's positions 0..q_pos (window > 0: the last `window`), read in place: (B, T, H, D).
at::Tensor paged_attention_step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor k_cache,
                                at::Tensor v_cache, const at::Tensor& block_tables, const at::Tensor& q_pos,
                                const c10::optional<at::Tensor>& cos, const c10::optional<at::Tensor>& sin,
                                int64_t block_size, double scale, int64_t window);

}  // namespace lmstack
