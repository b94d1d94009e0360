// CPU kernels of multi-scale deformable attention (the body is in kernels.h).
//
// Extensions are built for the baseline x86-64 instruction set (SSE2), which halves the vector width and
// drops fused multiply-add; on GCC for x86-64 the kernels are compiled a second time for AVX2 + FMA and
// chosen at run time when the CPU has them (1.1-1.8x on bench/msda.py's shapes); KSWAP_CPU_ISA=baseline forces
// the baseline build (for tests).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../ms_deform_attn.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define KSWAP_CPU_AVX2 1
#else
#define KSWAP_CPU_AVX2 0
#endif

namespace kswap {
namespace {

constexpr int64_t kCacheLine = 64;
constexpr int64_t kDenseSampling = 8;  // corners per row; measured by bench/msda.py's sparse row

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
    // float32 kernels name a map row by an int32, in the lanes of the sampling arithmetic
    TORCH_CHECK(spatial <= std::numeric_limits<int32_t>::max(), "ms_deform_attn: the CPU kernel takes at most ",
                std::numeric_limits<int32_t>::max(), " positions (S = ", spatial, ")");
  }

  // Whether each head's map is copied into a dense plane first (kernels.h): when its rows are sampled often
  // enough for the copy to pay, Lq * L * P * 4 corners for S rows.
  bool dense_planes = 4 * queries * levels * points >= kDenseSampling * spatial;
};

// The kernels of one instruction set and channel count.
template <typename scalar_t>
struct KernelSet {
  void (*forward)(const Geometry& g, const scalar_t* value, const scalar_t* loc, const scalar_t* attn,
                  scalar_t* out);
  void (*backward)(const Geometry& g, const scalar_t* value, const scalar_t* loc, const scalar_t* attn,
                   const scalar_t* grad_out, scalar_t* grad_value, scalar_t* grad_loc, scalar_t* grad_attn);
};

// The vector width of each build: GCC's target pragma does not define __AVX__ and the like in C++.
#define KSWAP_CPU_VEC_BYTES 16
namespace baseline {
#include "kernels.h"
}  // namespace baseline
#undef KSWAP_CPU_VEC_BYTES

#if KSWAP_CPU_AVX2
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define KSWAP_CPU_VEC_BYTES 32
namespace avx2 {
#include "kernels.h"
}  // namespace avx2
#undef KSWAP_CPU_VEC_BYTES
#pragma GCC pop_options
#endif

bool runs_avx2_fma() {
#if KSWAP_CPU_AVX2
  static const bool avx2_fma = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                               std::string(std::getenv("KSWAP_CPU_ISA") ? std::getenv("KSWAP_CPU_ISA") : "") !=
                                   "baseline";
  return avx2_fma;
#else
  return false;
#endif
}

template <typename scalar_t>
KernelSet<scalar_t> kernels_for(int64_t channels) {
#if KSWAP_CPU_AVX2
  if (runs_avx2_fma()) return avx2::kernels<scalar_t>(channels);
#endif
  return baseline::kernels<scalar_t>(channels);
}

}  // namespace

std::string ms_deform_attn_cpu_isa() { return runs_avx2_fma() ? "avx2+fma" : "baseline"; }

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights) {
  check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const Geometry g(value, spatial_shapes, level_start_index, sampling_locations);
  auto out = at::empty({g.batch, g.queries, g.heads * g.channels}, value.options());
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    kernels_for<scalar_t>(g.channels)
        .forward(g, value.data_ptr<scalar_t>(), sampling_locations.data_ptr<scalar_t>(),
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
  auto grad_value = g.dense_planes ? at::empty_like(value) : at::zeros_like(value);  // dense: every row written
  auto grad_loc = at::empty_like(sampling_locations);
  auto grad_attn = at::empty_like(attention_weights);
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    kernels_for<scalar_t>(g.channels)
        .backward(g, value.data_ptr<scalar_t>(), sampling_locations.data_ptr<scalar_t>(),
                  attention_weights.data_ptr<scalar_t>(), grad_output.data_ptr<scalar_t>(),
                  grad_value.data_ptr<scalar_t>(), grad_loc.data_ptr<scalar_t>(), grad_attn.data_ptr<scalar_t>());
  });
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace kswap
