#include "ms_deform_attn.h"

namespace kswap {

void check_ms_deform_attn_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                 const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                 const at::Tensor& attention_weights) {
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be (N, S, M, D), got ", value.sizes());
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
              "ms_deform_attn: spatial_shapes must be (L, 2), got ", spatial_shapes.sizes());
  const int64_t levels = spatial_shapes.size(0);
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == levels,
              "ms_deform_attn: level_start_index must be (L,) with L = ", levels, ", got ", level_start_index.sizes());
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
              "ms_deform_attn: sampling_locations must be (N, Lq, M, L, P, 2), got ", sampling_locations.sizes());
  const auto n = value.size(0), m = value.size(2);
  TORCH_CHECK(sampling_locations.size(0) == n && sampling_locations.size(2) == m && sampling_locations.size(3) == levels,
              "ms_deform_attn: sampling_locations ", sampling_locations.sizes(), " does not match value ",
              value.sizes(), " and ", levels, " levels");
  TORCH_CHECK(attention_weights.sizes() == sampling_locations.sizes().slice(0, 5),
              "ms_deform_attn: attention_weights must be (N, Lq, M, L, P) = ", sampling_locations.sizes().slice(0, 5),
              ", got ", attention_weights.sizes());
  for (const at::Tensor* t : {&value, &sampling_locations, &attention_weights}) {
    TORCH_CHECK(t->scalar_type() == value.scalar_type(), "ms_deform_attn: value, sampling_locations and "
                "attention_weights must share one dtype");
    TORCH_CHECK(t->device() == value.device(), "ms_deform_attn: all inputs must be on one device");
  }
  TORCH_CHECK(value.scalar_type() == at::kFloat || value.scalar_type() == at::kDouble,
              "ms_deform_attn: the kernel takes float32 or float64, got ", value.scalar_type());
  for (const at::Tensor* t : {&value, &spatial_shapes, &level_start_index, &sampling_locations, &attention_weights}) {
    TORCH_CHECK(t->is_contiguous(), "ms_deform_attn: inputs must be contiguous (call .contiguous())");
  }
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong && level_start_index.scalar_type() == at::kLong,
              "ms_deform_attn: spatial_shapes and level_start_index must be int64");
  const auto shapes = spatial_shapes.to(at::kCPU);
  const auto starts = level_start_index.to(at::kCPU);
  int64_t total = 0;
  for (int64_t l = 0; l < levels; ++l) {
    TORCH_CHECK(starts[l].item<int64_t>() == total, "ms_deform_attn: level_start_index[", l, "] is ",
                starts[l].item<int64_t>(), " but the levels before it hold ", total, " positions");
    total += shapes[l][0].item<int64_t>() * shapes[l][1].item<int64_t>();
  }
  TORCH_CHECK(total == value.size(1), "ms_deform_attn: spatial_shapes cover ", total,
              " positions but value has S = ", value.size(1));
}

void check_ms_deform_attn_grad_output(const at::Tensor& value, const at::Tensor& sampling_locations,
                                      const at::Tensor& grad_output) {
  const int64_t numel = value.size(0) * sampling_locations.size(1) * value.size(2) * value.size(3);
  TORCH_CHECK(grad_output.is_contiguous() && grad_output.scalar_type() == value.scalar_type() &&
                  grad_output.device() == value.device() && grad_output.numel() == numel,
              "ms_deform_attn: grad_output must be a contiguous (N, Lq, M * D) tensor of value's dtype and device");
}

}  // namespace kswap
