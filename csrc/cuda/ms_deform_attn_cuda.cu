// CUDA kernels of multi-scale deformable attention, float32 and float64 (half is upcast by the Python caller).
// Forward: one thread per output element (b, q, m, d). Backward: one thread per sampling point (b, q, m, l, p),
// reducing over the channels in registers and scattering the value gradient with atomicAdd.
#include <ATen/Dispatch.h>
#include <algorithm>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../bilinear.h"
#include "../ms_deform_attn.h"

namespace kswap {
namespace {

constexpr int kThreads = 256;

struct Dims {
  int64_t batch, spatial, heads, channels, queries, levels, points;
};

// The kernels stride over the grid, so a capped grid covers any n (an uncapped count overflows int).
inline int blocks_for(int64_t n) { return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 1 << 20)); }

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) forward_kernel(Dims g, const int64_t* shapes, const int64_t* starts, const scalar_t* value,
                               const scalar_t* loc, const scalar_t* attn, scalar_t* out) {
  const int64_t total = g.batch * g.queries * g.heads * g.channels;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t d = idx % g.channels;
    const int64_t m = (idx / g.channels) % g.heads;
    const int64_t bq = idx / (g.channels * g.heads);
    const int64_t b = bq / g.queries;
    const int64_t sample = (bq * g.heads + m) * g.levels * g.points;
    scalar_t acc = 0;
    for (int64_t l = 0; l < g.levels; ++l) {
      const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
      const scalar_t* v = value + ((b * g.spatial + starts[l]) * g.heads + m) * g.channels + d;
      for (int64_t p = 0; p < g.points; ++p) {
        const int64_t i = sample + l * g.points + p;
        const scalar_t h = loc[2 * i + 1] * H - scalar_t(0.5), w = loc[2 * i] * W - scalar_t(0.5);
        if (!touches_map(h, w, H, W)) continue;
        const BilinearCorners<scalar_t> c(h, w, H, W);
        for (int k = 0; k < 4; ++k) {
          if (c.offset[k] >= 0) acc += attn[i] * c.weight[k] * v[c.offset[k] * g.heads * g.channels];
        }
      }
    }
    out[idx] = acc;
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) backward_kernel(Dims g, const int64_t* shapes, const int64_t* starts, const scalar_t* value,
                                const scalar_t* loc, const scalar_t* attn, const scalar_t* grad_out,
                                scalar_t* grad_value, scalar_t* grad_loc, scalar_t* grad_attn) {
  const int64_t total = g.batch * g.queries * g.heads * g.levels * g.points;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t l = (i / g.points) % g.levels;
    const int64_t m = (i / (g.points * g.levels)) % g.heads;
    const int64_t bq = i / (g.points * g.levels * g.heads);
    const int64_t b = bq / g.queries;
    const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
    const scalar_t h = loc[2 * i + 1] * H - scalar_t(0.5), w = loc[2 * i] * W - scalar_t(0.5);
    if (!touches_map(h, w, H, W)) continue;
    const BilinearCorners<scalar_t> c(h, w, H, W);
    const scalar_t* go = grad_out + (bq * g.heads + m) * g.channels;
    const int64_t base = ((b * g.spatial + starts[l]) * g.heads + m) * g.channels;
    scalar_t d_attn = 0, d_h = 0, d_w = 0;
    for (int k = 0; k < 4; ++k) {
      if (c.offset[k] < 0) continue;
      const int64_t row = base + c.offset[k] * g.heads * g.channels;
      scalar_t dot = 0;
      for (int64_t d = 0; d < g.channels; ++d) {
        dot += go[d] * value[row + d];
        atomicAdd(grad_value + row + d, attn[i] * c.weight[k] * go[d]);
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

// The kernels read the level table on the device; callers may pass it on the CPU.
at::Tensor on_device(const at::Tensor& table, const at::Tensor& like) {
  return table.to(like.device(), /*non_blocking=*/false).contiguous();
}

Dims dims_of(const at::Tensor& value, const at::Tensor& sampling_locations) {
  return {value.size(0), value.size(1), value.size(2), value.size(3), sampling_locations.size(1),
          sampling_locations.size(3), sampling_locations.size(4)};
}

}  // namespace

at::Tensor ms_deform_attn_forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights) {
  check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const c10::cuda::CUDAGuard guard(value.device());
  const Dims g = dims_of(value, sampling_locations);
  auto out = at::empty({g.batch, g.queries, g.heads * g.channels}, value.options());
  const int64_t n = out.numel();
  if (n == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto shapes = on_device(spatial_shapes, value), starts = on_device(level_start_index, value);
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
    forward_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
        g, shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(), value.data_ptr<scalar_t>(),
        sampling_locations.data_ptr<scalar_t>(), attention_weights.data_ptr<scalar_t>(), out.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::vector<at::Tensor> ms_deform_attn_backward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                                     const at::Tensor& level_start_index,
                                                     const at::Tensor& sampling_locations,
                                                     const at::Tensor& attention_weights,
                                                     const at::Tensor& grad_output) {
  check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const c10::cuda::CUDAGuard guard(value.device());
  const Dims g = dims_of(value, sampling_locations);
  check_ms_deform_attn_grad_output(value, sampling_locations, grad_output);
  auto grad_value = at::zeros_like(value);
  auto grad_loc = at::zeros_like(sampling_locations);
  auto grad_attn = at::zeros_like(attention_weights);
  const int64_t n = attention_weights.numel();
  if (n == 0) return {grad_value, grad_loc, grad_attn};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto shapes = on_device(spatial_shapes, value), starts = on_device(level_start_index, value);
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
    backward_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
        g, shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(), value.data_ptr<scalar_t>(),
        sampling_locations.data_ptr<scalar_t>(), attention_weights.data_ptr<scalar_t>(),
        grad_output.data_ptr<scalar_t>(), grad_value.data_ptr<scalar_t>(), grad_loc.data_ptr<scalar_t>(),
        grad_attn.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace kswap
