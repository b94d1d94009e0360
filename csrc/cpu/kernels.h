// The CPU kernels' body, included twice by ms_deform_attn_cpu.cpp inside a namespace of its own: once for the
// baseline instruction set and once under `#pragma GCC target("avx2,fma")`, chosen at run time. It includes
// nothing (the including file does) so that every name here lands in that namespace.
//
// value is read in place (N, S, M, D): a bilinear corner is one contiguous row of D channels. Work runs one
// (batch, head) at a time, level by level, query after query: while the points of one query are gathered
// (forward) or scattered (backward), the corners of the next are computed and their rows prefetched. With D
// fixed at compile time (32: DINO's and Mask2Former's 256 / 8 heads) a query's output row, or its output
// gradient, stays in vector registers.

// The P sampling points of one (batch, query, head, level): four corners each, as offsets from the head's
// first value row and bilinear weights. Corners outside the map, and all four of a point that misses it, get
// weight 0 and offset 0, so the channel loops need no branch.
template <typename scalar_t>
struct Samples {
  std::vector<int64_t> offset;  // 4 per point
  std::vector<scalar_t> weight, dweight_dh, dweight_dw;

  explicit Samples(const Geometry& g)
      : offset(4 * g.points), weight(4 * g.points), dweight_dh(4 * g.points), dweight_dw(4 * g.points) {}

  // loc: the (x, y) pairs of these points.
  void fill(const Geometry& g, int64_t l, const scalar_t* loc) {
    const int64_t R = g.row_stride(), H = g.height[l], W = g.width[l];
    for (int64_t p = 0; p < g.points; ++p) {
      const scalar_t h = loc[2 * p + 1] * H - scalar_t(0.5), w = loc[2 * p] * W - scalar_t(0.5);
      const bool touches = touches_map(h, w, H, W);
      const BilinearCorners<scalar_t> c(touches ? h : scalar_t(0), touches ? w : scalar_t(0), H, W);
      for (int k = 0; k < 4; ++k) {
        const bool inside = touches && c.offset[k] >= 0;
        offset[4 * p + k] = inside ? (g.start[l] + c.offset[k]) * R : 0;
        weight[4 * p + k] = inside ? c.weight[k] : scalar_t(0);
        dweight_dh[4 * p + k] = inside ? c.dweight_dh[k] : scalar_t(0);
        dweight_dw[4 * p + k] = inside ? c.dweight_dw[k] : scalar_t(0);
      }
    }
  }

  // Ask for the D-channel rows of every corner in `plane` (value or its gradient) ahead of use.
  void prefetch(const scalar_t* plane, int64_t channels) const {
    for (const int64_t o : offset) {
      for (int64_t d = 0; d < channels; d += kCacheLine / sizeof(scalar_t)) __builtin_prefetch(plane + o + d);
    }
  }
};

// Prefetch n contiguous elements (a query's locations, weights or output gradient).
template <typename scalar_t>
inline void prefetch_span(const scalar_t* p, int64_t n) {
  for (int64_t k = 0; k < n; k += kCacheLine / sizeof(scalar_t)) __builtin_prefetch(p + k);
}

#ifdef __AVX__
constexpr int64_t kVecBytes = 32;
#else
constexpr int64_t kVecBytes = 16;
#endif

// The widest vectors the build targets (GCC/Clang vector extensions).
template <typename scalar_t>
struct Vec {
  typedef scalar_t type __attribute__((vector_size(kVecBytes)));
  static constexpr int64_t kSize = kVecBytes / sizeof(scalar_t);

  static type load(const scalar_t* p) {
    type v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  static void store(scalar_t* p, type v) { std::memcpy(p, &v, sizeof v); }
  static scalar_t sum(type v) {
    scalar_t s = 0;
    for (int64_t i = 0; i < kSize; ++i) s += v[i];
    return s;
  }
};

// One (batch, query, head)'s output row, accumulated over its corners: in vector registers when the channel
// count is kChannels (> 0, a multiple of the vector size), else in the output itself.
template <typename scalar_t, int64_t kChannels>
class OutRow {
  using V = Vec<scalar_t>;
  static constexpr int64_t kVecs = kChannels / V::kSize;
  static_assert(kChannels % V::kSize == 0, "kChannels must be a multiple of the vector size");

 public:
  // first: start from zero, else from what out holds (the levels before).
  OutRow(scalar_t* out, int64_t, bool first) : out_(out) {
    for (int64_t j = 0; j < kVecs; ++j) acc_[j] = first ? typename V::type{} : V::load(out + j * V::kSize);
  }
  void add(scalar_t a, const scalar_t* x) {
    for (int64_t j = 0; j < kVecs; ++j) acc_[j] += a * V::load(x + j * V::kSize);
  }
  void finish() const {
    for (int64_t j = 0; j < kVecs; ++j) V::store(out_ + j * V::kSize, acc_[j]);
  }

 private:
  scalar_t* out_;
  typename V::type acc_[kVecs];
};

template <typename scalar_t>
class OutRow<scalar_t, 0> {
 public:
  OutRow(scalar_t* out, int64_t channels, bool first) : out_(out), channels_(channels) {
    if (first) {
      for (int64_t d = 0; d < channels_; ++d) out_[d] = 0;
    }
  }
  void add(scalar_t a, const scalar_t* x) {
    for (int64_t d = 0; d < channels_; ++d) out_[d] += a * x[d];
  }
  void finish() const {}

 private:
  scalar_t* out_;
  int64_t channels_;
};

// One (batch, query, head)'s output gradient, in vector registers when the channel count is kChannels (> 0).
template <typename scalar_t, int64_t kChannels>
class GradRow {
  using V = Vec<scalar_t>;
  static constexpr int64_t kVecs = kChannels / V::kSize;

 public:
  GradRow(const scalar_t* grad_out, int64_t) {
    for (int64_t j = 0; j < kVecs; ++j) go_[j] = V::load(grad_out + j * V::kSize);
  }
  // Adds a * grad_out to g and returns the lanes of grad_out * x (their sum is the dot product), in one pass.
  typename V::type dot_and_scatter(const scalar_t* x, scalar_t a, scalar_t* g) const {
    typename V::type dot{};
    for (int64_t j = 0; j < kVecs; ++j) {
      dot += go_[j] * V::load(x + j * V::kSize);
      V::store(g + j * V::kSize, V::load(g + j * V::kSize) + a * go_[j]);
    }
    return dot;
  }

 private:
  typename V::type go_[kVecs];
};

template <typename scalar_t>
class GradRow<scalar_t, 0> {
 public:
  GradRow(const scalar_t* grad_out, int64_t channels) : go_(grad_out), channels_(channels) {}
  typename Vec<scalar_t>::type dot_and_scatter(const scalar_t* __restrict__ x, scalar_t a,
                                               scalar_t* __restrict__ g) const {
    typename Vec<scalar_t>::type dot{};  // the dot product in lane 0
    for (int64_t d = 0; d < channels_; ++d) {
      dot[0] += go_[d] * x[d];
      g[d] += a * go_[d];
    }
    return dot;
  }

 private:
  const scalar_t* go_;
  int64_t channels_;
};

// Runs body(q, l, i, samples) for queries [q_begin, q_end) of one (batch, head) whose first value row is
// `plane`, level by level (a level's rows are a smaller working set than the whole map), with the next
// query's corners already computed and their rows (in plane and extra_plane) prefetched. i is the index of the
// first of the P points in attention_weights.
template <typename scalar_t, typename Body>
void for_each_query(const Geometry& g, int64_t b, int64_t m, int64_t q_begin, int64_t q_end, const scalar_t* loc,
                    const scalar_t* attn, const scalar_t* plane, const scalar_t* extra_plane, Body body) {
  const int64_t P = g.points, M = g.heads;
  Samples<scalar_t> current(g), next(g);
  for (int64_t l = 0; l < g.levels; ++l) {
    const auto first = [&](int64_t q) { return (((b * g.queries + q) * M + m) * g.levels + l) * P; };
    if (q_begin < q_end) current.fill(g, l, loc + 2 * first(q_begin));
    for (int64_t q = q_begin; q < q_end; ++q) {
      if (q + 2 < q_end) {
        prefetch_span(loc + 2 * first(q + 2), 2 * P);
        prefetch_span(attn + first(q + 2), P);
      }
      if (q + 1 < q_end) {
        next.fill(g, l, loc + 2 * first(q + 1));
        next.prefetch(plane, g.channels);
        if (extra_plane != nullptr) next.prefetch(extra_plane, g.channels);
      }
      body(q, l, first(q), current);
      std::swap(current, next);
    }
  }
}

template <typename scalar_t, int64_t kChannels>
void forward_kernel(const Geometry& g, const scalar_t* value, const scalar_t* loc, const scalar_t* attn,
                    scalar_t* out) {
  const int64_t D = g.channels, M = g.heads, P = g.points;
  // A task is a block of queries of one (batch, head); a thread's consecutive tasks share the head's rows.
  const int64_t block = 64, blocks = (g.queries + block - 1) / block;
  at::parallel_for(0, g.batch * M * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks / M, m = task / blocks % M, q0 = task % blocks * block;
      const scalar_t* plane = value + (b * g.spatial * M + m) * D;
      for_each_query(g, b, m, q0, std::min(g.queries, q0 + block), loc, attn, plane,
                     static_cast<const scalar_t*>(nullptr),
                     [&](int64_t q, int64_t l, int64_t i, const Samples<scalar_t>& s) {
                       OutRow<scalar_t, kChannels> row(out + ((b * g.queries + q) * M + m) * D, D, l == 0);
                       for (int64_t c = 0; c < 4 * P; ++c) row.add(attn[i + c / 4] * s.weight[c], plane + s.offset[c]);
                       row.finish();
                     });
    }
  });
}

// Parallel over (batch, head): the value-gradient rows of one head have a single writer, so no atomics.
template <typename scalar_t, int64_t kChannels>
void backward_kernel(const Geometry& g, const scalar_t* value, const scalar_t* loc, const scalar_t* attn,
                     const scalar_t* grad_out, scalar_t* grad_value, scalar_t* grad_loc, scalar_t* grad_attn) {
  const int64_t D = g.channels, M = g.heads, P = g.points;
  at::parallel_for(0, g.batch * M, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bm = begin; bm < end; ++bm) {
      const int64_t b = bm / M, m = bm % M, first_row = (b * g.spatial * M + m) * D;
      const scalar_t* plane = value + first_row;
      scalar_t* grad_plane = grad_value + first_row;
      for_each_query(g, b, m, 0, g.queries, loc, attn, plane, grad_plane,
                     [&](int64_t q, int64_t l, int64_t i0, const Samples<scalar_t>& s) {
        const GradRow<scalar_t, kChannels> go(grad_out + ((b * g.queries + q) * M + m) * D, D);
        for (int64_t p = 0; p < P; ++p) {
          const int64_t i = i0 + p;
          typename Vec<scalar_t>::type d_attn{}, d_h{}, d_w{};  // summed over lanes last: one reduction each
          for (int64_t c = 4 * p; c < 4 * p + 4; ++c) {
            const auto dot = go.dot_and_scatter(plane + s.offset[c], attn[i] * s.weight[c], grad_plane + s.offset[c]);
            d_attn += s.weight[c] * dot;
            d_h += s.dweight_dh[c] * dot;
            d_w += s.dweight_dw[c] * dot;
          }
          grad_attn[i] = Vec<scalar_t>::sum(d_attn);
          grad_loc[2 * i] = attn[i] * Vec<scalar_t>::sum(d_w) * g.width[l];
          grad_loc[2 * i + 1] = attn[i] * Vec<scalar_t>::sum(d_h) * g.height[l];
        }
      });
    }
  });
}


// D fixed at compile time where it is DINO's and Mask2Former's 32, else read at run time.
template <typename scalar_t>
KernelSet<scalar_t> kernels(int64_t channels) {
  if (channels == 32) return {forward_kernel<scalar_t, 32>, backward_kernel<scalar_t, 32>};
  return {forward_kernel<scalar_t, 0>, backward_kernel<scalar_t, 0>};
}
