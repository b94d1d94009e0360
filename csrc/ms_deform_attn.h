// Multi-scale deformable attention (Deformable DETR), forward and backward, for CPU and CUDA.
//
// Shapes: value (N, S, M, D), spatial_shapes (L, 2) int64 (H, W), level_start_index (L,) int64,
// sampling_locations (N, Lq, M, L, P, 2) normalised (x, y) in [0, 1], attention_weights (N, Lq, M, L, P).
// Output: (N, Lq, M * D). Sampling is bilinear with zero padding and pixel centres at (i + 0.5) / W, i.e.
// grid_sample(align_corners=False). All tensors must be contiguous; float32 or float64.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

namespace kswap {

// The instruction set the CPU kernels run with: "avx2+fma" or "baseline" (KSWAP_CPU_ISA=baseline forces it).
std::string ms_deform_attn_cpu_isa();

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights);

std::vector<at::Tensor> ms_deform_attn_backward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                                    const at::Tensor& level_start_index,
                                                    const at::Tensor& sampling_locations,
                                                    const at::Tensor& attention_weights, const at::Tensor& grad_output);

#ifdef KSWAP_WITH_CUDA
at::Tensor ms_deform_attn_forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights);

std::vector<at::Tensor> ms_deform_attn_backward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                                     const at::Tensor& level_start_index,
                                                     const at::Tensor& sampling_locations,
                                                     const at::Tensor& attention_weights,
                                                     const at::Tensor& grad_output);
#endif

// Shape and dtype checks shared by both devices; raises c10::Error (a Python RuntimeError) naming the input.
void check_ms_deform_attn_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                 const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                 const at::Tensor& attention_weights);

// The backward pass's extra input: a contiguous (N, Lq, M * D) gradient of value's dtype.
void check_ms_deform_attn_grad_output(const at::Tensor& value, const at::Tensor& sampling_locations,
                                      const at::Tensor& grad_output);

}  // namespace kswap
