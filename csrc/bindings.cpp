// Python bindings of kswap._C: multi-scale deformable attention, dispatched on the inputs' device.
#include <torch/extension.h>

#include "ms_deform_attn.h"

namespace kswap {
namespace {

at::Tensor forward(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                   const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  if (value.is_cuda()) {
#ifdef KSWAP_WITH_CUDA
    return ms_deform_attn_forward_cuda(value, spatial_shapes, level_start_index, sampling_locations,
                                       attention_weights);
#else
    TORCH_CHECK(false, "kswap._C was built without CUDA");
#endif
  }
  return ms_deform_attn_forward_cpu(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
}

std::vector<at::Tensor> backward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                 const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                 const at::Tensor& attention_weights, const at::Tensor& grad_output) {
  if (value.is_cuda()) {
#ifdef KSWAP_WITH_CUDA
    return ms_deform_attn_backward_cuda(value, spatial_shapes, level_start_index, sampling_locations,
                                        attention_weights, grad_output);
#else
    TORCH_CHECK(false, "kswap._C was built without CUDA");
#endif
  }
  return ms_deform_attn_backward_cpu(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                                     grad_output);
}

bool with_cuda() {
#ifdef KSWAP_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace
}  // namespace kswap

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kswap compiled ops: multi-scale deformable attention (CPU, and CUDA when built with it)";
  m.def("ms_deform_attn_forward", &kswap::forward, "MSDeformAttn forward -> (N, Lq, M*D)");
  m.def("ms_deform_attn_backward", &kswap::backward,
        "MSDeformAttn backward -> [grad_value, grad_sampling_locations, grad_attention_weights]");
  m.def("with_cuda", &kswap::with_cuda, "whether the CUDA kernels were compiled in");
  m.def("cpu_isa", &kswap::ms_deform_attn_cpu_isa, "the instruction set the CPU kernels run with");
}
