// The CPU kernels' body, included twice by ms_deform_attn_cpu.cpp inside a namespace of its own: once for the
// baseline instruction set and once under `#pragma GCC target("avx2,fma")`, chosen at run time. It includes
// nothing (the including file does) so that every name here lands in that namespace.
//
// Work runs one (batch, head) at a time. In place in (N, S, M, D) a head's rows are D channels every M * D, a
// stride that maps them onto a fraction of the cache's sets, so most bilinear corners miss the cache; where
// the map is sampled densely (Geometry::dense_planes) the head's rows are first copied into a DensePlane,
// whose S * D values (680 KB for DINO's 5440 positions of 32 channels), and their gradient, stay in a core's
// L2. Sampled sparsely (a large map, few queries), the copy would cost more than the corners it saves: rows
// are read in place. Either way the next query's corners are prefetched. The backward sweeps a head twice,
// once reading the value rows (the sampling gradients) and once writing their gradient: a head's value and
// gradient planes together (1.4 MB) would not fit a 1 MB L2, one at a time they do. With D fixed at compile
// time (32: DINO's and Mask2Former's 256 / 8 heads) a query's output row, or its output gradient, stays in
// vector registers.

// Prefetch n contiguous elements.
template <typename scalar_t>
inline void prefetch_span(const scalar_t* p, int64_t n) {
  for (int64_t k = 0; k < n; k += kCacheLine / sizeof(scalar_t)) __builtin_prefetch(p + k);
}

// One (batch, head)'s rows: where row s starts is data + s * stride.
template <typename scalar_t>
struct HeadRows {
  scalar_t* data;
  int64_t stride;
};

template <typename scalar_t>
HeadRows<const scalar_t> read_only(HeadRows<scalar_t> rows) {
  return {rows.data, rows.stride};
}

// One (batch, head)'s S rows copied contiguous, from and back to a head of (N, S, M, D).
template <typename scalar_t>
class DensePlane {
 public:
  DensePlane(int64_t rows, int64_t channels) : rows_(rows), channels_(channels), data_(rows * channels) {}

  HeadRows<scalar_t> load(HeadRows<const scalar_t> from) {
    for (int64_t s = 0; s < rows_; ++s) std::copy_n(from.data + s * from.stride, channels_, &data_[s * channels_]);
    return rows();
  }
  HeadRows<scalar_t> zero() {
    std::fill(data_.begin(), data_.end(), scalar_t(0));
    return rows();
  }
  void store(HeadRows<scalar_t> to) const {
    for (int64_t s = 0; s < rows_; ++s) std::copy_n(&data_[s * channels_], channels_, to.data + s * to.stride);
  }

 private:
  HeadRows<scalar_t> rows() { return {data_.data(), channels_}; }

  int64_t rows_, channels_;
  std::vector<scalar_t> data_;
};

constexpr int64_t kVecBytes = KSWAP_CPU_VEC_BYTES;

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

  // Integer lanes as wide as scalar_t's: what comparisons of `type`s give, and whole numbers.
  using integer = std::conditional_t<sizeof(scalar_t) == 4, int32_t, int64_t>;
  typedef integer integer_type __attribute__((vector_size(kVecBytes)));
  static integer_type load_integer(const integer* p) {
    integer_type v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  static void store_integer(integer* p, integer_type v) { std::memcpy(p, &v, sizeof v); }
  static integer_type to_integer(type v) { return __builtin_convertvector(v, integer_type); }  // toward zero
  static type floor(type v) {
    const type toward_zero = __builtin_convertvector(to_integer(v), type);
    return toward_zero + __builtin_convertvector(toward_zero > v, type);  // a true lane is -1
  }
  // The lane sums of a, b, c and d, by rounds of pairwise additions of lanes (log2(kSize) rounds).
  static std::array<scalar_t, 4> sum4(type a, type b, type c, type d) {
    const auto half = std::make_index_sequence<kSize / 2>();
    const type ab = pair_sums(a, b, half), cd = pair_sums(c, d, half);
    if constexpr (kSize == 2) {
      return {ab[0], ab[1], cd[0], cd[1]};
    } else {
      type abcd = pair_sums(ab, cd, half);  // kSize / 4 partial sums of a, then of b, c and d
      for (int64_t n = kSize / 4; n > 1; n /= 2) abcd = pair_sums(abcd, abcd, half);
      return {abcd[0], abcd[1], abcd[2], abcd[3]};
    }
  }

 private:
  // (x0 + x1, x2 + x3, ..., y0 + y1, y2 + y3, ...)
  template <size_t... I>
  static type pair_sums(type x, type y, std::index_sequence<I...>) {
    return __builtin_shufflevector(x, y, (2 * I)..., (kSize + 2 * I)...) +
           __builtin_shufflevector(x, y, (2 * I + 1)..., (kSize + 2 * I + 1)...);
  }
};

// The L * P sampling points of one (batch, query, head), level after level: four corners each (top-left,
// top-right, bottom-left, bottom-right) as the map row they read, bilinear weights and the weights' derivatives
// in h and w, one array per corner. A corner outside the map, and all four of a point that misses it, get
// weight 0 and row 0, so the channel loops need no branch. In the backward each corner also gets the dot
// product of the output gradient with its row, from which `write_gradients` computes the points' attention
// and location gradients. `fill` and `write_gradients` work on a vector of points at a time.
template <typename scalar_t>
class Samples {
  using V = Vec<scalar_t>;
  using T = typename V::type;
  using R = typename V::integer_type;

 public:
  using Row = typename V::integer;  // a map row; as wide as scalar_t, so that its lanes match (S is checked)

  explicit Samples(const Geometry& g)
      : n_(g.levels * g.points),
        padded_((n_ + V::kSize - 1) / V::kSize * V::kSize),
        values_(kValueArrays * padded_),
        rows_(kRowArrays * padded_) {  // the padding: points at (0, 0) of a 0x0 map, which sample nothing
    for (int64_t j = 0; j < n_; ++j) {
      const int64_t l = j / g.points;
      array(kHeight)[j] = static_cast<scalar_t>(g.height[l]);
      array(kWidth)[j] = static_cast<scalar_t>(g.width[l]);
      rows_[kColumns * padded_ + j] = static_cast<Row>(g.width[l]);
      rows_[kStart * padded_ + j] = static_cast<Row>(g.start[l]);
    }
  }

  // Point j's corner k: its map row and bilinear weight.
  Row row(int k, int64_t j) const { return rows_[k * padded_ + j]; }
  scalar_t weight(int k, int64_t j) const { return values_[(kWeight + k) * padded_ + j]; }
  // The dot products of the output gradient with point j's four corner rows.
  void set_dots(int64_t j, const std::array<scalar_t, 4>& dots) {
    for (int k = 0; k < 4; ++k) values_[(kDot + k) * padded_ + j] = dots[k];
  }

  // loc: the (x, y) pairs of these points.
  void fill(const scalar_t* loc) {
    scalar_t *x = array(kX), *y = array(kY);
    for (int64_t j = 0; j < n_; ++j) {
      x[j] = loc[2 * j];
      y[j] = loc[2 * j + 1];
    }
    for (int64_t j = 0; j < padded_; j += V::kSize) {
      const T H = V::load(array(kHeight) + j), W = V::load(array(kWidth) + j);
      const T h = V::load(y + j) * H - scalar_t(0.5), w = V::load(x + j) * W - scalar_t(0.5);
      // pixel centres at integers; a point touches the map when within one pixel of it (false for NaN too)
      const R touches = (h > -1) & (w > -1) & (h < H) & (w < W);
      const T h_in = touches ? h : T{}, w_in = touches ? w : T{};
      const T h0 = V::floor(h_in), w0 = V::floor(w_in), fh = h_in - h0, fw = w_in - w0;
      const R top = touches & (h0 >= 0), bottom = touches & (h0 + 1 < H);
      const R left = touches & (w0 >= 0), right = touches & (w0 + 1 < W);
      const R columns = V::load_integer(&rows_[kColumns * padded_ + j]);
      const R first = V::load_integer(&rows_[kStart * padded_ + j]) + V::to_integer(h0) * columns + V::to_integer(w0);
      const R inside[4] = {top & left, top & right, bottom & left, bottom & right};
      const R corner[4] = {first, first + 1, first + columns, first + columns + 1};
      const T weights[4] = {(1 - fh) * (1 - fw), (1 - fh) * fw, fh * (1 - fw), fh * fw};
      const T by_h[4] = {fw - 1, -fw, 1 - fw, fw};
      const T by_w[4] = {fh - 1, 1 - fh, -fh, fh};
      for (int k = 0; k < 4; ++k) {
        V::store_integer(&rows_[k * padded_ + j], inside[k] ? corner[k] : R{});
        V::store(array(kWeight + k) + j, inside[k] ? weights[k] : T{});
        V::store(array(kWeightByH + k) + j, inside[k] ? by_h[k] : T{});
        V::store(array(kWeightByW + k) + j, inside[k] ? by_w[k] : T{});
      }
    }
  }

  // From the corners' dot products (set_dots): the points' gradients of attention weight and (x, y) location,
  // given their attention weights (attn), into grad_attn and grad_loc.
  void write_gradients(const scalar_t* attn, scalar_t* grad_attn, scalar_t* grad_loc) {
    std::copy_n(attn, n_, array(kAttn));  // padding stays 0
    for (int64_t j = 0; j < padded_; j += V::kSize) {
      T by_attn{}, by_h{}, by_w{};
      for (int k = 0; k < 4; ++k) {
        const T dot = V::load(array(kDot + k) + j);
        by_attn += V::load(array(kWeight + k) + j) * dot;
        by_h += V::load(array(kWeightByH + k) + j) * dot;
        by_w += V::load(array(kWeightByW + k) + j) * dot;
      }
      const T a = V::load(array(kAttn) + j);
      V::store(array(kGradAttn) + j, by_attn);
      V::store(array(kGradX) + j, a * by_w * V::load(array(kWidth) + j));
      V::store(array(kGradY) + j, a * by_h * V::load(array(kHeight) + j));
    }
    std::copy_n(array(kGradAttn), n_, grad_attn);
    for (int64_t j = 0; j < n_; ++j) {
      grad_loc[2 * j] = array(kGradX)[j];
      grad_loc[2 * j + 1] = array(kGradY)[j];
    }
  }

  // Ask for the D-channel rows of every corner ahead of use.
  void prefetch(HeadRows<const scalar_t> rows, int64_t channels) const {
    for (int k = 0; k < 4; ++k) {
      for (int64_t j = 0; j < n_; ++j) prefetch_span(rows.data + row(k, j) * rows.stride, channels);
    }
  }

 private:
  // values_ holds padded_ of each: 4 corners' weights, 4 of d/dh, 4 of d/dw, 4 dot products, then each point's
  // x, y, its level's height and width, its attention weight and the gradients of attention weight, x and y;
  // rows_ holds 4 corners' rows, then each point's level's width and first row.
  enum : int64_t { kWeight = 0, kWeightByH = 4, kWeightByW = 8, kDot = 12, kX = 16, kY, kHeight, kWidth, kAttn,
                   kGradAttn, kGradX, kGradY, kValueArrays };
  enum : int64_t { kColumns = 4, kStart, kRowArrays };

  scalar_t* array(int64_t which) { return &values_[which * padded_]; }

  int64_t n_, padded_;  // points, and points rounded up to whole vectors
  std::vector<scalar_t> values_;
  std::vector<Row> rows_;
};

// One (batch, query, head)'s output row, accumulated over its corners: in vector registers when the channel
// count is kChannels (> 0, a multiple of the vector size), else in the output itself.
template <typename scalar_t, int64_t kChannels>
class OutRow {
  using V = Vec<scalar_t>;
  static constexpr int64_t kVecs = kChannels / V::kSize;
  static_assert(kChannels % V::kSize == 0, "kChannels must be a multiple of the vector size");

 public:
  OutRow(scalar_t* out, int64_t) : out_(out) {
    for (int64_t j = 0; j < kVecs; ++j) acc_[j] = typename V::type{};
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
  OutRow(scalar_t* out, int64_t channels) : out_(out), channels_(channels) {
    for (int64_t d = 0; d < channels_; ++d) out_[d] = 0;
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
  // The lanes of grad_out * x: their sum is the dot product.
  typename V::type dot(const scalar_t* x) const {
    typename V::type lanes{};
    for (int64_t j = 0; j < kVecs; ++j) lanes += go_[j] * V::load(x + j * V::kSize);
    return lanes;
  }
  // g += a * grad_out
  void scatter(scalar_t a, scalar_t* g) const {
    for (int64_t j = 0; j < kVecs; ++j) V::store(g + j * V::kSize, V::load(g + j * V::kSize) + a * go_[j]);
  }

 private:
  typename V::type go_[kVecs];
};

template <typename scalar_t>
class GradRow<scalar_t, 0> {
 public:
  GradRow(const scalar_t* grad_out, int64_t channels) : go_(grad_out), channels_(channels) {}
  typename Vec<scalar_t>::type dot(const scalar_t* x) const {
    typename Vec<scalar_t>::type lanes{};  // the dot product in lane 0
    for (int64_t d = 0; d < channels_; ++d) lanes[0] += go_[d] * x[d];
    return lanes;
  }
  void scatter(scalar_t a, scalar_t* g) const {
    for (int64_t d = 0; d < channels_; ++d) g[d] += a * go_[d];
  }

 private:
  const scalar_t* go_;
  int64_t channels_;
};

// What a sweep over one head's queries reads or writes query by query, besides map rows, for it to prefetch: per
// point, the sampling locations and attention weights, in the backward their gradients too; per query, D
// channels of the output or of its gradient.
template <typename scalar_t>
struct QueryStreams {
  const scalar_t* loc;
  const scalar_t* attn;
  const scalar_t* channels;
  const scalar_t* grad_loc = nullptr;
  const scalar_t* grad_attn = nullptr;
};

// Runs body(q, i, samples) for queries [q_begin, q_end) of one (batch, head) sampled in `rows`; i is the index
// of the query's first point in attention_weights (its L * P points follow, level after level). One head's
// consecutive queries lie M rows apart in each of `streams`, a stride the hardware prefetcher does not follow:
// those of the query two ahead are prefetched. The next query's corners are computed ahead and their rows
// prefetched.
template <typename scalar_t, typename Body>
void for_each_query(const Geometry& g, int64_t b, int64_t m, int64_t q_begin, int64_t q_end,
                    const QueryStreams<scalar_t>& streams, HeadRows<const scalar_t> rows, Body body) {
  constexpr int64_t kAhead = 2;
  const int64_t LP = g.levels * g.points;
  const auto point = [&](int64_t q) { return ((b * g.queries + q) * g.heads + m) * LP; };
  Samples<scalar_t> first(g), second(g);
  Samples<scalar_t> *current = &first, *next = &second;
  if (q_begin < q_end) current->fill(streams.loc + 2 * point(q_begin));
  for (int64_t q = q_begin; q < q_end; ++q) {
    if (q + kAhead < q_end) {
      const int64_t ahead = point(q + kAhead);
      for (const scalar_t* per_point : {streams.loc, streams.grad_loc}) {
        if (per_point != nullptr) prefetch_span(per_point + 2 * ahead, 2 * LP);
      }
      for (const scalar_t* per_point : {streams.attn, streams.grad_attn}) {
        if (per_point != nullptr) prefetch_span(per_point + ahead, LP);
      }
      prefetch_span(streams.channels + ((b * g.queries + q + kAhead) * g.heads + m) * g.channels, g.channels);
    }
    if (q + 1 < q_end) {
      next->fill(streams.loc + 2 * point(q + 1));
      next->prefetch(rows, g.channels);
    }
    body(q, point(q), *current);
    std::swap(current, next);
  }
}

template <typename scalar_t, int64_t kChannels>
void forward_kernel(const Geometry& g, const scalar_t* value, const scalar_t* loc, const scalar_t* attn,
                    scalar_t* out) {
  const int64_t D = g.channels, M = g.heads, LP = g.levels * g.points, S = g.spatial;
  // A task is a block of queries of one (batch, head); a thread copies a head's plane when its tasks reach it.
  const int64_t block = 64, blocks = (g.queries + block - 1) / block;
  at::parallel_for(0, g.batch * M * blocks, 1, [&](int64_t begin, int64_t end) {
    DensePlane<scalar_t> plane(g.dense_planes ? S : 0, D);
    HeadRows<const scalar_t> rows{};
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bm = task / blocks, b = bm / M, m = bm % M, q0 = task % blocks * block;
      if (task == begin || q0 == 0) {
        const HeadRows<const scalar_t> in_place{value + (b * S * M + m) * D, M * D};
        rows = g.dense_planes ? read_only(plane.load(in_place)) : in_place;
      }
      for_each_query(g, b, m, q0, std::min(g.queries, q0 + block), {loc, attn, out}, rows,
                     [&](int64_t q, int64_t i, const Samples<scalar_t>& s) {
                       OutRow<scalar_t, kChannels> row(out + ((b * g.queries + q) * M + m) * D, D);
                       for (int64_t j = 0; j < LP; ++j) {
                         for (int k = 0; k < 4; ++k) {
                           row.add(attn[i + j] * s.weight(k, j), rows.data + s.row(k, j) * rows.stride);
                         }
                       }
                       row.finish();
                     });
    }
  });
}

// The sampling gradients of one (batch, head) sampled in `rows`: grad_attn and grad_loc.
template <typename scalar_t, int64_t kChannels>
void sampling_gradients(const Geometry& g, int64_t b, int64_t m, HeadRows<const scalar_t> rows, const scalar_t* loc,
                        const scalar_t* attn, const scalar_t* grad_out, scalar_t* grad_loc, scalar_t* grad_attn) {
  using V = Vec<scalar_t>;
  const QueryStreams<scalar_t> streams{loc, attn, grad_out, grad_loc, grad_attn};
  for_each_query(g, b, m, 0, g.queries, streams, rows, [&](int64_t q, int64_t i, Samples<scalar_t>& s) {
    const GradRow<scalar_t, kChannels> go(grad_out + ((b * g.queries + q) * g.heads + m) * g.channels, g.channels);
    for (int64_t j = 0; j < g.levels * g.points; ++j) {
      typename V::type dot[4];
      for (int k = 0; k < 4; ++k) dot[k] = go.dot(rows.data + s.row(k, j) * rows.stride);
      s.set_dots(j, V::sum4(dot[0], dot[1], dot[2], dot[3]));
    }
    s.write_gradients(attn + i, grad_attn + i, grad_loc + 2 * i);
  });
}

// The value gradient of one (batch, head): each corner's row in grad_rows gains attn * weight * grad_out.
template <typename scalar_t, int64_t kChannels>
void value_gradient(const Geometry& g, int64_t b, int64_t m, const scalar_t* loc, const scalar_t* attn,
                    const scalar_t* grad_out, HeadRows<scalar_t> grad_rows) {
  for_each_query(g, b, m, 0, g.queries, {loc, attn, grad_out}, read_only(grad_rows),
                 [&](int64_t q, int64_t i, const Samples<scalar_t>& s) {
    const GradRow<scalar_t, kChannels> go(grad_out + ((b * g.queries + q) * g.heads + m) * g.channels, g.channels);
    for (int64_t j = 0; j < g.levels * g.points; ++j) {
      for (int k = 0; k < 4; ++k) {
        go.scatter(attn[i + j] * s.weight(k, j), grad_rows.data + s.row(k, j) * grad_rows.stride);
      }
    }
  });
}

// Parallel over (batch, head): the value-gradient rows of one head have a single writer, so no atomics. With
// dense planes every row of grad_value is written (from the thread's plane); in place grad_value must come
// zeroed.
template <typename scalar_t, int64_t kChannels>
void backward_kernel(const Geometry& g, const scalar_t* value, const scalar_t* loc, const scalar_t* attn,
                     const scalar_t* grad_out, scalar_t* grad_value, scalar_t* grad_loc, scalar_t* grad_attn) {
  const int64_t D = g.channels, M = g.heads, S = g.spatial;
  at::parallel_for(0, g.batch * M, 1, [&](int64_t begin, int64_t end) {
    const int64_t plane_rows = g.dense_planes ? S : 0;
    DensePlane<scalar_t> plane(plane_rows, D), grad_plane(plane_rows, D);
    for (int64_t bm = begin; bm < end; ++bm) {
      const int64_t b = bm / M, m = bm % M, first = (b * S * M + m) * D;
      const HeadRows<const scalar_t> value_in_place{value + first, M * D};
      const HeadRows<scalar_t> grad_in_place{grad_value + first, M * D};
      const HeadRows<const scalar_t> rows = g.dense_planes ? read_only(plane.load(value_in_place)) : value_in_place;
      sampling_gradients<scalar_t, kChannels>(g, b, m, rows, loc, attn, grad_out, grad_loc, grad_attn);
      const HeadRows<scalar_t> grad_rows = g.dense_planes ? grad_plane.zero() : grad_in_place;
      value_gradient<scalar_t, kChannels>(g, b, m, loc, attn, grad_out, grad_rows);
      if (g.dense_planes) grad_plane.store(grad_in_place);
    }
  });
}

// D fixed at compile time where it is DINO's and Mask2Former's 32, else read at run time.
template <typename scalar_t>
KernelSet<scalar_t> kernels(int64_t channels) {
  if (channels == 32) return {forward_kernel<scalar_t, 32>, backward_kernel<scalar_t, 32>};
  return {forward_kernel<scalar_t, 0>, backward_kernel<scalar_t, 0>};
}
