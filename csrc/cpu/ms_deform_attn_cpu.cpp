// CPU kernels of multi-scale deformable attention: parallel over (batch, query) in the forward pass and over
// (batch, head) in the backward pass, so that no two threads write the same value-gradient row.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "../bilinear.h"
#include "../ms_deform_attn.h"

namespace kswap {
namespace {

struct Geometry {
  int64_t batch, spatial, heads, channels, queries, levels, points;
  std::vector<int64_t> height, width, start;

  Geometry(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
           const at::Tensor& sampling_locations)
      : batch(value.size(0)),
        spatial(value.size(1)),
        heads(value.size(2)),
        channels(value.size(3)),
        queries(sampling_locations.size(1)),
        levels(sampling_locations.size(3)),
        points(sampling_locations.size(4)) {
    const auto shapes = spatial_shapes.to(at::kCPU).contiguous();
    const auto starts = level_start_index.to(at::kCPU).contiguous();
    for (int64_t l = 0; l < levels; ++l) {
      height.push_back(shapes.data_ptr<int64_t>()[2 * l]);
      width.push_back(shapes.data_ptr<int64_t>()[2 * l + 1]);
      start.push_back(starts.data_ptr<int64_t>()[l]);
    }
  }
};

template <typename scalar_t>
void forward_kernel(const Geometry& g, const scalar_t* value, const scalar_t* loc, const scalar_t* attn,
                    scalar_t* out) {
  const int64_t D = g.channels, M = g.heads;
  at::parallel_for(0, g.batch * g.queries, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bq = begin; bq < end; ++bq) {
      const int64_t b = bq / g.queries;
      for (int64_t m = 0; m < M; ++m) {
        scalar_t* o = out + (bq * M + m) * D;
        const int64_t sample = (bq * M + m) * g.levels * g.points;
        for (int64_t l = 0; l < g.levels; ++l) {
          const int64_t H = g.height[l], W = g.width[l];
          const scalar_t* v = value + ((b * g.spatial + g.start[l]) * M + m) * D;
          for (int64_t p = 0; p < g.points; ++p) {
            const int64_t i = sample + l * g.points + p;
            const scalar_t h = loc[2 * i + 1] * H - scalar_t(0.5), w = loc[2 * i] * W - scalar_t(0.5);
            if (!touches_map(h, w, H, W)) continue;
            const BilinearCorners<scalar_t> c(h, w, H, W);
            for (int k = 0; k < 4; ++k) {
              if (c.offset[k] < 0) continue;
              const scalar_t weight = attn[i] * c.weight[k];
              const scalar_t* vk = v + c.offset[k] * M * D;
              for (int64_t d = 0; d < D; ++d) o[d] += weight * vk[d];
            }
          }
        }
      }
    }
  });
}

template <typename scalar_t>
void backward_kernel(const Geometry& g, const scalar_t* value, const scalar_t* loc, const scalar_t* attn,
                     const scalar_t* grad_out, scalar_t* grad_value, scalar_t* grad_loc, scalar_t* grad_attn) {
  const int64_t D = g.channels, M = g.heads;
  // Each (b, m) owns grad_value[b, :, m, :], so the scatter into it needs no atomics.
  at::parallel_for(0, g.batch * M, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bm = begin; bm < end; ++bm) {
      const int64_t b = bm / M, m = bm % M;
      for (int64_t q = 0; q < g.queries; ++q) {
        const int64_t bq = b * g.queries + q;
        const scalar_t* go = grad_out + (bq * M + m) * D;
        const int64_t sample = (bq * M + m) * g.levels * g.points;
        for (int64_t l = 0; l < g.levels; ++l) {
          const int64_t H = g.height[l], W = g.width[l];
          const int64_t base = ((b * g.spatial + g.start[l]) * M + m) * D;
          for (int64_t p = 0; p < g.points; ++p) {
            const int64_t i = sample + l * g.points + p;
            const scalar_t h = loc[2 * i + 1] * H - scalar_t(0.5), w = loc[2 * i] * W - scalar_t(0.5);
            if (!touches_map(h, w, H, W)) continue;
            const BilinearCorners<scalar_t> c(h, w, H, W);
            scalar_t d_attn = 0, d_h = 0, d_w = 0;
            for (int k = 0; k < 4; ++k) {
              if (c.offset[k] < 0) continue;
              const int64_t row = base + c.offset[k] * M * D;
              scalar_t dot = 0;
              for (int64_t d = 0; d < D; ++d) {
                dot += go[d] * value[row + d];
                grad_value[row + d] += attn[i] * c.weight[k] * go[d];
              }
              d_attn += c.weight[k] * dot;
              d_h += c.dweight_dh[k] * dot;
              d_w += c.dweight_dw[k] * dot;
            }
            grad_attn[i] = d_attn;
            grad_loc[2 * i] = attn[i] * d_w * W;
            grad_loc[2 * i + 1] = attn[i] * d_h * H;
          }
        }
      }
    }
  });
}

}  // namespace

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights) {
  check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const Geometry g(value, spatial_shapes, level_start_index, sampling_locations);
  auto out = at::zeros({g.batch, g.queries, g.heads * g.channels}, value.options());
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    forward_kernel<scalar_t>(g, value.data_ptr<scalar_t>(), sampling_locations.data_ptr<scalar_t>(),
                             attention_weights.data_ptr<scalar_t>(), out.data_ptr<scalar_t>());
  });
  return out;
}

std::vector<at::Tensor> ms_deform_attn_backward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                                    const at::Tensor& level_start_index,
                                                    const at::Tensor& sampling_locations,
                                                    const at::Tensor& attention_weights,
                                                    const at::Tensor& grad_output) {
  check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const Geometry g(value, spatial_shapes, level_start_index, sampling_locations);
  TORCH_CHECK(grad_output.is_contiguous() && grad_output.scalar_type() == value.scalar_type() &&
                  grad_output.numel() == g.batch * g.queries * g.heads * g.channels,
              "ms_deform_attn: grad_output must be a contiguous (N, Lq, M * D) tensor of value's dtype");
  auto grad_value = at::zeros_like(value);
  auto grad_loc = at::zeros_like(sampling_locations);
  auto grad_attn = at::zeros_like(attention_weights);
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    backward_kernel<scalar_t>(g, value.data_ptr<scalar_t>(), sampling_locations.data_ptr<scalar_t>(),
                              attention_weights.data_ptr<scalar_t>(), grad_output.data_ptr<scalar_t>(),
                              grad_value.data_ptr<scalar_t>(), grad_loc.data_ptr<scalar_t>(),
                              grad_attn.data_ptr<scalar_t>());
  });
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace kswap
