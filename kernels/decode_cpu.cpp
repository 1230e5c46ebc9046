// CPU kernels for one decode step of the generation engine (kernels/decode_cpu.py loads them).
//
// selfreward::decode_attention - one query token per row, everything between the QKV GEMM and
//   the output-projection GEMM in one call: RoPE on the queries and the key, the key and value
//   written into the KV cache, GQA attention over the row's valid cached columns (after an
//   optional shared prefix held once for all rows), softmax and the weighted sum of values.
// selfreward::rms_norm - x * rsqrt(mean(x^2) + eps) * weight over the last dimension.
//
// Both compute in fp32 and round once to the tensors' dtype (fp32 or bf16). Their references,
// op for op in plain torch, are in decode_cpu_ref.py; tests/unit/test_kernel_decode_cpu.py
// compares the two.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

template <typename T>
inline void to_float(const T* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename T>
inline void from_float(const float* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

// 16 fp32 lanes (one AVX-512 register; two AVX2 ones): explicit vectors, because gcc keeps
// the reductions below scalar otherwise (one FMA latency per element).
constexpr int64_t kLanes = 16;
typedef float vfloat __attribute__((vector_size(kLanes * sizeof(float))));
typedef int vint __attribute__((vector_size(kLanes * sizeof(int))));

inline vfloat load_v(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store_v(float* p, vfloat v) { std::memcpy(p, &v, sizeof v); }

inline float sum_lanes(vfloat v) {
  v += __builtin_shuffle(v, vint{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
  v += __builtin_shuffle(v, vint{4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
  v += __builtin_shuffle(v, vint{2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
  v += __builtin_shuffle(v, vint{1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
  return v[0];
}

inline float dot(const float* a, const float* b, int64_t n) {
  vfloat acc0 = {}, acc1 = {};
  int64_t i = 0;
  for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
    acc0 += load_v(a + i) * load_v(b + i);
    acc1 += load_v(a + i + kLanes) * load_v(b + i + kLanes);
  }
  for (; i + kLanes <= n; i += kLanes) acc0 += load_v(a + i) * load_v(b + i);
  float total = sum_lanes(acc0 + acc1);
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

// acc += w * x
inline void axpy(float w, const float* x, float* acc, int64_t n) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) store_v(acc + i, load_v(acc + i) + w * load_v(x + i));
  for (; i < n; ++i) acc[i] += w * x[i];
}

// out = x * cos + swap_halves(x) * sin over the first `rot` dims (sin carries the sign of
// rotate_half: [-sin, sin]); dims past `rot` pass through.
template <typename T>
inline void rope(const T* x, const float* cos, const float* sin, int64_t rot, int64_t dim,
                 float* out) {
  const int64_t half = rot / 2;
  for (int64_t i = 0; i < dim; ++i) out[i] = static_cast<float>(x[i]);
  for (int64_t i = 0; i < half; ++i) {
    const float a = static_cast<float>(x[i]), b = static_cast<float>(x[i + half]);
    out[i] = a * cos[i] + b * sin[i];
    out[i + half] = b * cos[i + half] + a * sin[i + half];
  }
}

typedef uint16_t vhalf __attribute__((vector_size(kLanes * sizeof(uint16_t))));
typedef uint32_t vword __attribute__((vector_size(kLanes * sizeof(uint32_t))));

inline vfloat load_f(const float* p) { return load_v(p); }

inline vfloat load_f(const at::BFloat16* p) {  // bf16 is the top half of an fp32
  vhalf h;
  std::memcpy(&h, p, sizeof h);
  return reinterpret_cast<vfloat>(__builtin_convertvector(h, vword) << 16);
}

// Lane c of the result is the sum of the lanes of p[c] (a transposing tree: 15 adds).
inline vfloat sum_lanes16(vfloat* p) {
  const vint lo8{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
  const vint hi8{8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
  const vint lo4{0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
  const vint hi4{4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31};
  const vint lo2{0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29};
  const vint hi2{2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31};
  const vint lo1{0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
  const vint hi1{1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
  vfloat u[8], w[4], x[2];
  for (int k = 0; k < 8; ++k)
    u[k] = __builtin_shuffle(p[2 * k], p[2 * k + 1], lo8) + __builtin_shuffle(p[2 * k], p[2 * k + 1], hi8);
  for (int k = 0; k < 4; ++k)
    w[k] = __builtin_shuffle(u[2 * k], u[2 * k + 1], lo4) + __builtin_shuffle(u[2 * k], u[2 * k + 1], hi4);
  for (int k = 0; k < 2; ++k)
    x[k] = __builtin_shuffle(w[2 * k], w[2 * k + 1], lo2) + __builtin_shuffle(w[2 * k], w[2 * k + 1], hi2);
  return __builtin_shuffle(x[0], x[1], lo1) + __builtin_shuffle(x[0], x[1], hi1);
}

// exp(x) for x <= 0 (softmax after subtracting the max): Cephes' expf polynomial after
// x = n ln2 + r, |r| <= ln2 / 2 (relative error about 2e-7). x is clamped at -87, so -inf (a
// masked column) gives about 1e-38, nothing beside the max column's 1.
inline vfloat exp_nonpositive(vfloat x) {
  const vfloat lowest = vfloat{} - 87.0f;
  x = x < lowest ? lowest : x;
  const vfloat t = x * 1.44269504088896341f + 0.5f;
  vint n = __builtin_convertvector(t, vint);           // truncates toward zero
  n += reinterpret_cast<vint>(__builtin_convertvector(n, vfloat) > t);  // -1 where that was up: floor
  const vfloat nf = __builtin_convertvector(n, vfloat);
  const vfloat r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
  vfloat p = vfloat{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const vfloat y = p * r * r + r + 1.0f;
  return y * reinterpret_cast<vfloat>((n + 127) << 23);
}

// scores[j] = exp(scores[j] - max); returns the sum (the softmax denominator).
inline float softmax_unnormalised(float* scores, int64_t n) {
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) top = std::max(top, scores[j]);
  vfloat sum = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const vfloat e = exp_nonpositive(load_v(scores + j) - top);
    store_v(scores + j, e);
    sum += e;
  }
  float total = sum_lanes(sum);
  for (; j < n; ++j) {
    scores[j] = std::exp(scores[j] - top);
    total += scores[j];
  }
  return total;
}

// A run of cache columns one row attends: keys/values [count, dim]; valid = null: all of them,
// else column j is attended if valid[j] or j == count - 1 (the row's own new column).
template <typename T>
struct Segment {
  const T* keys;
  const T* values;
  int64_t count;
  const bool* valid;
  bool attended(int64_t j) const { return valid == nullptr || valid[j] || j == count - 1; }
};

// Heads [h0, h0 + H) of one KV group against 16-column blocks of a segment: the H queries stay
// in registers, each key is converted to fp32 once, and the 16 dot products of a head are
// reduced together (sum_lanes16). scores[h * stride + j] = q_h . key_j, -inf where not attended.
template <typename T, int64_t V, int64_t H>
void score_heads(const float* q, const Segment<T>& seg, float* scores, int64_t stride) {
  constexpr float kMasked = -std::numeric_limits<float>::infinity();
  vfloat query[H][V];
  for (int64_t h = 0; h < H; ++h)
    for (int64_t v = 0; v < V; ++v) query[h][v] = load_v(q + (h * V + v) * kLanes);
  vfloat part[H][kLanes];
  for (int64_t b0 = 0; b0 < seg.count; b0 += kLanes) {
    const int64_t cnt = std::min(kLanes, seg.count - b0);
    for (int64_t c = 0; c < cnt; ++c) {
      vfloat key[V];
      for (int64_t v = 0; v < V; ++v) key[v] = load_f(seg.keys + ((b0 + c) * V + v) * kLanes);
      for (int64_t h = 0; h < H; ++h) {
        vfloat acc = query[h][0] * key[0];
        for (int64_t v = 1; v < V; ++v) acc += query[h][v] * key[v];
        part[h][c] = acc;
      }
    }
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t c = cnt; c < kLanes; ++c) part[h][c] = vfloat{};
      const vfloat sums = sum_lanes16(part[h]);
      float* out = scores + h * stride + b0;
      for (int64_t c = 0; c < cnt; ++c) out[c] = seg.attended(b0 + c) ? sums[c] : kMasked;
    }
  }
}

// acc[h] += weights[h * stride + j] * value_j over the segment's attended columns for heads
// [0, H), the accumulators in registers. Columns not attended are skipped, not multiplied by 0:
// an unwritten cache column may hold NaN.
template <typename T, int64_t V, int64_t H>
void accumulate_heads(const float* weights, const Segment<T>& seg, int64_t stride, float* acc) {
  vfloat sum[H][V];
  for (int64_t h = 0; h < H; ++h)
    for (int64_t v = 0; v < V; ++v) sum[h][v] = vfloat{};
  for (int64_t j = 0; j < seg.count; ++j) {
    if (!seg.attended(j)) continue;
    vfloat value[V];
    for (int64_t v = 0; v < V; ++v) value[v] = load_f(seg.values + (j * V + v) * kLanes);
    for (int64_t h = 0; h < H; ++h) {
      const float w = weights[h * stride + j];
      for (int64_t v = 0; v < V; ++v) sum[h][v] += w * value[v];
    }
  }
  for (int64_t h = 0; h < H; ++h)
    for (int64_t v = 0; v < V; ++v) {
      float* a = acc + (h * V + v) * kLanes;
      store_v(a, load_v(a) + sum[h][v]);
    }
}

// Heads in blocks of up to 4 (a block's queries or accumulators fill 4 * V registers).
template <int64_t V, typename Block>
void for_head_blocks(int64_t per_group, Block&& block) {
  for (int64_t h0 = 0; h0 < per_group;) {
    switch (std::min<int64_t>(4, per_group - h0)) {
      case 4: block(h0, std::integral_constant<int64_t, 4>{}); h0 += 4; break;
      case 3: block(h0, std::integral_constant<int64_t, 3>{}); h0 += 3; break;
      case 2: block(h0, std::integral_constant<int64_t, 2>{}); h0 += 2; break;
      default: block(h0, std::integral_constant<int64_t, 1>{}); h0 += 1; break;
    }
  }
}

// Every head of the group against a segment: V = head_dim / 16 at compile time (the blocked
// code above), or 0 for any head size (plain loops).
template <typename T, int64_t V>
void score_segment(const float* q, int64_t per_group, int64_t dim, const Segment<T>& seg,
                   float* scores, int64_t stride, float* row) {
  if constexpr (V == 0) {
    constexpr float kMasked = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < seg.count; ++j) {
      to_float(seg.keys + j * dim, row, dim);
      for (int64_t h = 0; h < per_group; ++h)
        scores[h * stride + j] = seg.attended(j) ? dot(q + h * dim, row, dim) : kMasked;
    }
  } else {
    for_head_blocks<V>(per_group, [&](int64_t h0, auto heads) {
      score_heads<T, V, decltype(heads)::value>(q + h0 * dim, seg, scores + h0 * stride, stride);
    });
  }
}

template <typename T, int64_t V>
void accumulate_segment(const float* weights, int64_t per_group, int64_t dim,
                        const Segment<T>& seg, int64_t stride, float* acc, float* row) {
  if constexpr (V == 0) {
    for (int64_t j = 0; j < seg.count; ++j) {
      if (!seg.attended(j)) continue;
      to_float(seg.values + j * dim, row, dim);
      for (int64_t h = 0; h < per_group; ++h) axpy(weights[h * stride + j], row, acc + h * dim, dim);
    }
  } else {
    for_head_blocks<V>(per_group, [&](int64_t h0, auto heads) {
      accumulate_heads<T, V, decltype(heads)::value>(weights + h0 * stride, seg, stride, acc + h0 * dim);
    });
  }
}

template <typename T, int64_t V>
void decode_attention_impl(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                           at::Tensor& keys, at::Tensor& values, const at::Tensor& valid,
                           const at::Tensor* prefix_keys, const at::Tensor* prefix_values,
                           int64_t prefix_len, int64_t start, double scale, at::Tensor& out) {
  const int64_t rows = qkv.size(0), groups = qkv.size(1), per_group = qkv.size(2) - 2;
  const int64_t dim = qkv.size(3), rot = cos.size(1), max_len = keys.size(2);
  const int64_t prefix_cols = prefix_keys ? prefix_keys->size(2) : 0;
  const T* qkv_p = qkv.data_ptr<T>();
  const float* cos_p = cos.data_ptr<float>();
  const float* sin_p = sin.data_ptr<float>();
  T* keys_p = keys.data_ptr<T>();
  T* values_p = values.data_ptr<T>();
  const bool* valid_p = valid.data_ptr<bool>();
  const T* pk_p = prefix_keys ? prefix_keys->data_ptr<T>() : nullptr;
  const T* pv_p = prefix_values ? prefix_values->data_ptr<T>() : nullptr;
  T* out_p = out.data_ptr<T>();
  const float fscale = static_cast<float>(scale);
  const int64_t n = start + 1;  // scores: prefix columns, then the row's own [prefix_len, start]

  at::parallel_for(0, rows * groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q(per_group * dim), acc(per_group * dim), key(dim), row(dim);
    std::vector<float> scores(per_group * n), total(per_group);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / groups, g = task % groups;
      const T* base = qkv_p + task * (per_group + 2) * dim;
      const float* c = cos_p + r * rot;
      const float* s = sin_p + r * rot;
      for (int64_t h = 0; h < per_group; ++h) {
        rope(base + h * dim, c, s, rot, dim, q.data() + h * dim);
        for (int64_t i = 0; i < dim; ++i) q[h * dim + i] *= fscale;
      }
      // The new key (rotated) and value go into the cache column `start`.
      const int64_t own = (r * groups + g) * max_len;
      rope(base + per_group * dim, c, s, rot, dim, key.data());
      from_float(key.data(), keys_p + (own + start) * dim, dim);
      std::copy(base + (per_group + 1) * dim, base + (per_group + 2) * dim,
                values_p + (own + start) * dim);

      const Segment<T> shared{pk_p + g * prefix_cols * dim, pv_p + g * prefix_cols * dim,
                              prefix_len, nullptr};
      const Segment<T> mine{keys_p + (own + prefix_len) * dim, values_p + (own + prefix_len) * dim,
                            start + 1 - prefix_len, valid_p + r * max_len + prefix_len};
      if (prefix_len) score_segment<T, V>(q.data(), per_group, dim, shared, scores.data(), n, row.data());
      score_segment<T, V>(q.data(), per_group, dim, mine, scores.data() + prefix_len, n, row.data());
      for (int64_t h = 0; h < per_group; ++h) total[h] = softmax_unnormalised(scores.data() + h * n, n);
      std::fill(acc.begin(), acc.end(), 0.f);
      if (prefix_len) accumulate_segment<T, V>(scores.data(), per_group, dim, shared, n, acc.data(), row.data());
      accumulate_segment<T, V>(scores.data() + prefix_len, per_group, dim, mine, n, acc.data(), row.data());
      for (int64_t h = 0; h < per_group; ++h) {
        const float inv = 1.f / total[h];
        float* a = acc.data() + h * dim;
        for (int64_t i = 0; i < dim; ++i) a[i] *= inv;
        from_float(a, out_p + (r * groups * per_group + g * per_group + h) * dim, dim);
      }
    }
  });
}

template <typename T>
void decode_attention_dispatch(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                               at::Tensor& keys, at::Tensor& values, const at::Tensor& valid,
                               const at::Tensor* pk, const at::Tensor* pv, int64_t prefix_len,
                               int64_t start, double scale, at::Tensor& out) {
  switch (qkv.size(3)) {  // the common head sizes get register-blocked code
    case 64:
      return decode_attention_impl<T, 4>(qkv, cos, sin, keys, values, valid, pk, pv, prefix_len, start, scale, out);
    case 128:
      return decode_attention_impl<T, 8>(qkv, cos, sin, keys, values, valid, pk, pv, prefix_len, start, scale, out);
    default:
      return decode_attention_impl<T, 0>(qkv, cos, sin, keys, values, valid, pk, pv, prefix_len, start, scale, out);
  }
}

void check(bool ok, const std::string& what) { TORCH_CHECK(ok, "selfreward::decode_attention: ", what); }

at::Tensor decode_attention(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                            at::Tensor keys, at::Tensor values, const at::Tensor& valid,
                            const std::optional<at::Tensor>& prefix_keys,
                            const std::optional<at::Tensor>& prefix_values, int64_t prefix_len,
                            int64_t start, double scale) {
  check(qkv.dim() == 4 && qkv.size(2) >= 3,
        "qkv must be [rows, kv_groups, heads_per_group + 2, head_dim]");
  const int64_t rows = qkv.size(0), groups = qkv.size(1), dim = qkv.size(3);
  check(qkv.is_contiguous() && keys.is_contiguous() && values.is_contiguous() &&
            cos.is_contiguous() && sin.is_contiguous() && valid.is_contiguous(),
        "every tensor must be contiguous");
  check(keys.sizes() == values.sizes() && keys.dim() == 4 && keys.size(0) == rows &&
            keys.size(1) == groups && keys.size(3) == dim,
        "keys/values must be [rows, kv_groups, max_len, head_dim] like qkv");
  check(keys.scalar_type() == qkv.scalar_type() && values.scalar_type() == qkv.scalar_type(),
        "the cache must have qkv's dtype");
  check(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.dim() == 2 &&
            cos.sizes() == sin.sizes() && cos.size(0) == rows && cos.size(1) <= dim &&
            cos.size(1) % 2 == 0,
        "cos/sin must be fp32 [rows, rotary_dim] with an even rotary_dim <= head_dim");
  check(valid.scalar_type() == at::kBool && valid.dim() == 2 && valid.size(0) == rows &&
            valid.size(1) == keys.size(2),
        "valid must be bool [rows, max_len]");
  check(start >= prefix_len && start < keys.size(2), "start must lie in [prefix_len, max_len)");
  check(prefix_keys.has_value() == prefix_values.has_value(), "give both prefix tensors or none");
  check(prefix_len == 0 || prefix_keys.has_value(), "prefix_len > 0 needs the prefix tensors");
  const at::Tensor* pk = nullptr;
  const at::Tensor* pv = nullptr;
  if (prefix_keys.has_value()) {
    pk = &prefix_keys.value();
    pv = &prefix_values.value();
    check(pk->is_contiguous() && pv->is_contiguous() && pk->sizes() == pv->sizes() &&
              pk->dim() == 4 && pk->size(0) == 1 && pk->size(1) == groups &&
              pk->size(3) == dim && pk->size(2) >= prefix_len &&
              pk->scalar_type() == qkv.scalar_type() && pv->scalar_type() == qkv.scalar_type(),
          "prefix keys/values must be contiguous [1, kv_groups, >= prefix_len, head_dim] of qkv's dtype");
  }
  auto out = at::empty({rows, groups * (qkv.size(2) - 2) * dim}, qkv.options());
  if (qkv.scalar_type() == at::kFloat) {
    decode_attention_dispatch<float>(qkv, cos, sin, keys, values, valid, pk, pv, prefix_len, start,
                                 scale, out);
  } else if (qkv.scalar_type() == at::kBFloat16) {
    decode_attention_dispatch<at::BFloat16>(qkv, cos, sin, keys, values, valid, pk, pv, prefix_len,
                                        start, scale, out);
  } else {
    check(false, "dtype must be float32 or bfloat16");
  }
  return out;
}

template <typename T>
void rms_norm_impl(const at::Tensor& x, const at::Tensor& weight, double eps, at::Tensor& out) {
  const int64_t hidden = x.size(-1), rows = x.numel() / hidden;
  const T* x_p = x.data_ptr<T>();
  const T* w_p = weight.data_ptr<T>();
  T* out_p = out.data_ptr<T>();
  // Small inputs (decode rows) stay on the calling thread: a parallel region costs more.
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / hidden);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> v(hidden), w(hidden);
    to_float(w_p, w.data(), hidden);
    for (int64_t r = begin; r < end; ++r) {
      to_float(x_p + r * hidden, v.data(), hidden);
      const float mean = dot(v.data(), v.data(), hidden) / static_cast<float>(hidden);
      const float inv = 1.f / std::sqrt(mean + static_cast<float>(eps));
#pragma omp simd
      for (int64_t i = 0; i < hidden; ++i) v[i] = v[i] * inv * w[i];
      from_float(v.data(), out_p + r * hidden, hidden);
    }
  });
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous() && weight.dim() == 1 &&
                  x.size(-1) == weight.size(0) && x.scalar_type() == weight.scalar_type(),
              "selfreward::rms_norm: contiguous x [..., hidden] and weight [hidden] of one dtype");
  auto out = at::empty_like(x);
  if (x.scalar_type() == at::kFloat) {
    rms_norm_impl<float>(x, weight, eps, out);
  } else if (x.scalar_type() == at::kBFloat16) {
    rms_norm_impl<at::BFloat16>(x, weight, eps, out);
  } else {
    TORCH_CHECK(false, "selfreward::rms_norm: dtype must be float32 or bfloat16");
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(selfreward, m) {
  m.def(
      "decode_attention(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) keys, Tensor(b!) values, "
      "Tensor valid, Tensor? prefix_keys, Tensor? prefix_values, int prefix_len, int start, "
      "float scale) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(selfreward, CPU, m) {
  m.impl("decode_attention", &decode_attention);
  m.impl("rms_norm", &rms_norm);
}
