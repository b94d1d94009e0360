// CPU kernels of multi-scale deformable attention, parallel over (batch, head) value planes.
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

// Where the (batch, head) plane of value starts and how far apart its rows are: value as given (N, S, M, D),
// or transposed to (N, M, S, D) so that a plane is contiguous.
struct Layout {
  bool transposed;
  int64_t spatial, heads, channels, row_stride;

  Layout(const Geometry& g, bool transposed)
      : transposed(transposed),
        spatial(g.spatial),
        heads(g.heads),
        channels(g.channels),
        row_stride(transposed ? g.channels : g.heads * g.channels) {}

  int64_t plane(int64_t b, int64_t m) const {
    return transposed ? (b * heads + m) * spatial * channels : (b * spatial * heads + m) * channels;
  }

  // Transposing costs two copies of value; it pays off when each plane row is sampled many times.
  static bool worth_transposing(const Geometry& g) {
    return g.queries * g.levels * g.points >= kTransposeRatio * g.spatial;
  }
  static constexpr int64_t kTransposeRatio = 8;
};

// y += a * x over the D channels of one sample.
template <typename scalar_t>
inline void axpy(int64_t n, scalar_t a, const scalar_t* __restrict__ x, scalar_t* __restrict__ y) {
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) y[d] += a * x[d];
}

// Returns <go, v> and adds scale * go to g, in one pass over the D channels.
template <typename scalar_t>
inline scalar_t dot_and_axpy(int64_t n, const scalar_t* __restrict__ go, const scalar_t* __restrict__ v,
                             scalar_t scale, scalar_t* __restrict__ g) {
  scalar_t dot = 0;
#pragma omp simd reduction(+ : dot)
  for (int64_t d = 0; d < n; ++d) {
    dot += go[d] * v[d];
    g[d] += scale * go[d];
  }
  return dot;
}

// Both kernels walk one (batch, head) value plane at a time: the plane stays in cache while every query of
// that head samples it, and the value-gradient plane has a single writer, so the scatter needs no atomics.
// kChannels > 0 fixes D at compile time (32: DINO's and Mask2Former's 256 / 8 heads), so the channel loops
// unroll; 0 reads it at run time.
template <typename scalar_t, int64_t kChannels>
void forward_kernel(const Geometry& g, const Layout& layout, const scalar_t* value, const scalar_t* loc,
                    const scalar_t* attn, scalar_t* out) {
  const int64_t D = kChannels > 0 ? kChannels : g.channels, M = g.heads, R = layout.row_stride;
  at::parallel_for(0, g.batch * M, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bm = begin; bm < end; ++bm) {
      const int64_t b = bm / M, m = bm % M;
      const scalar_t* plane = value + layout.plane(b, m);
      for (int64_t q = 0; q < g.queries; ++q) {
        const int64_t bqm = (b * g.queries + q) * M + m;
        scalar_t* o = out + bqm * D;
        for (int64_t l = 0; l < g.levels; ++l) {
          const int64_t H = g.height[l], W = g.width[l];
          const scalar_t* v = plane + g.start[l] * R;
          for (int64_t p = 0; p < g.points; ++p) {
            const int64_t i = (bqm * g.levels + l) * g.points + p;
            const scalar_t h = loc[2 * i + 1] * H - scalar_t(0.5), w = loc[2 * i] * W - scalar_t(0.5);
            if (!touches_map(h, w, H, W)) continue;
            const BilinearCorners<scalar_t> c(h, w, H, W);
            for (int k = 0; k < 4; ++k) {
              if (c.offset[k] >= 0) axpy(D, attn[i] * c.weight[k], v + c.offset[k] * R, o);
            }
          }
        }
      }
    }
  });
}

template <typename scalar_t, int64_t kChannels>
void backward_kernel(const Geometry& g, const Layout& layout, const scalar_t* value, const scalar_t* loc,
                     const scalar_t* attn, const scalar_t* grad_out, scalar_t* grad_value, scalar_t* grad_loc,
                     scalar_t* grad_attn) {
  const int64_t D = kChannels > 0 ? kChannels : g.channels, M = g.heads, R = layout.row_stride;
  at::parallel_for(0, g.batch * M, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bm = begin; bm < end; ++bm) {
      const int64_t b = bm / M, m = bm % M;
      const scalar_t* plane = value + layout.plane(b, m);
      scalar_t* grad_plane = grad_value + layout.plane(b, m);
      for (int64_t q = 0; q < g.queries; ++q) {
        const int64_t bqm = (b * g.queries + q) * M + m;
        const scalar_t* go = grad_out + bqm * D;
        for (int64_t l = 0; l < g.levels; ++l) {
          const int64_t H = g.height[l], W = g.width[l];
          const int64_t level = g.start[l] * R;
          for (int64_t p = 0; p < g.points; ++p) {
            const int64_t i = (bqm * g.levels + l) * g.points + p;
            const scalar_t h = loc[2 * i + 1] * H - scalar_t(0.5), w = loc[2 * i] * W - scalar_t(0.5);
            if (!touches_map(h, w, H, W)) continue;
            const BilinearCorners<scalar_t> c(h, w, H, W);
            scalar_t d_attn = 0, d_h = 0, d_w = 0;
            for (int k = 0; k < 4; ++k) {
              if (c.offset[k] < 0) continue;
              const int64_t row = level + c.offset[k] * R;
              const scalar_t dot = dot_and_axpy(D, go, plane + row, attn[i] * c.weight[k], grad_plane + row);
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
  const Layout layout(g, Layout::worth_transposing(g));
  const auto planes = layout.transposed ? value.permute({0, 2, 1, 3}).contiguous() : value;
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    const auto kernel = g.channels == 32 ? forward_kernel<scalar_t, 32> : forward_kernel<scalar_t, 0>;
    kernel(g, layout, planes.data_ptr<scalar_t>(), sampling_locations.data_ptr<scalar_t>(),
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
  check_ms_deform_attn_grad_output(value, sampling_locations, grad_output);
  const Layout layout(g, Layout::worth_transposing(g));
  const auto planes = layout.transposed ? value.permute({0, 2, 1, 3}).contiguous() : value;
  auto grad_planes = at::zeros_like(planes);
  auto grad_loc = at::zeros_like(sampling_locations);
  auto grad_attn = at::zeros_like(attention_weights);
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    const auto kernel = g.channels == 32 ? backward_kernel<scalar_t, 32> : backward_kernel<scalar_t, 0>;
    kernel(g, layout, planes.data_ptr<scalar_t>(), sampling_locations.data_ptr<scalar_t>(),
           attention_weights.data_ptr<scalar_t>(), grad_output.data_ptr<scalar_t>(), grad_planes.data_ptr<scalar_t>(),
           grad_loc.data_ptr<scalar_t>(), grad_attn.data_ptr<scalar_t>());
  });
  auto grad_value = layout.transposed ? grad_planes.permute({0, 2, 1, 3}).contiguous() : grad_planes;
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace kswap
