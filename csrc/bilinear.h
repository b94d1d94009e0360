// Bilinear sampling of one (H, W) level of `value` at a point, with the derivatives the backward pass needs, for
// the CUDA kernels (the CPU kernels compute the same corners a vector of points at a time: cpu/kernels.h).
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define KSWAP_HOST_DEVICE __host__ __device__
#else
#define KSWAP_HOST_DEVICE
#endif

namespace kswap {

// The four neighbours of a sampling point and their bilinear weights; a neighbour outside the map has
// offset -1 and contributes zero (zero padding).
template <typename scalar_t>
struct BilinearCorners {
  int64_t offset[4];  // row-major pixel index h * W + w, or -1 when outside
  scalar_t weight[4];
  // d(weight)/dh and d(weight)/dw, for the location gradient.
  scalar_t dweight_dh[4];
  scalar_t dweight_dw[4];

  // h, w: the point in pixel coordinates of the level (pixel centres at integers). It must touch the map
  // (touches_map), so that its corners leave the map on one side at most.
  KSWAP_HOST_DEVICE BilinearCorners(scalar_t h, scalar_t w, int64_t height, int64_t width) {
    const int64_t h_low = static_cast<int64_t>(floor(h));
    const int64_t w_low = static_cast<int64_t>(floor(w));
    const scalar_t lh = h - h_low, lw = w - w_low;
    const scalar_t hh = 1 - lh, hw = 1 - lw;
    const bool top = h_low >= 0, bottom = h_low + 1 < height, left = w_low >= 0, right = w_low + 1 < width;
    const int64_t base = h_low * width + w_low;
    offset[0] = top && left ? base : -1;
    offset[1] = top && right ? base + 1 : -1;
    offset[2] = bottom && left ? base + width : -1;
    offset[3] = bottom && right ? base + width + 1 : -1;
    const scalar_t wts[4] = {hh * hw, hh * lw, lh * hw, lh * lw};
    const scalar_t ddh[4] = {-hw, -lw, hw, lw};
    const scalar_t ddw[4] = {-hh, hh, -lh, lh};
    for (int k = 0; k < 4; ++k) {
      weight[k] = wts[k];
      dweight_dh[k] = ddh[k];
      dweight_dw[k] = ddw[k];
    }
  }
};

// Whether a point in pixel coordinates touches the map at all (else it samples zero, with zero gradients).
template <typename scalar_t>
KSWAP_HOST_DEVICE inline bool touches_map(scalar_t h, scalar_t w, int64_t height, int64_t width) {
  return h > -1 && w > -1 && h < height && w < width;
}

}  // namespace kswap
