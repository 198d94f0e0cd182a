// One carved FFN layer at decode, on the CPU, in one call: route, run the chosen experts
// (optionally only each expert's kept neurons, MoNE), add the compensation of the experts left
// out. What the PyTorch path spends at one token is not bandwidth but per-op overhead: about 30
// small ops per layer at 3-5 us each, as long as reading the active experts' weights. Here each
// weight row is read once, in place (no gather copy), and nothing else is allocated per row.
//
// Built on first use by cmoe_kernels.cpu_decode (torch.utils.cpp_extension), fp32 only.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <sys/mman.h>

#include <algorithm>
#include <cstdlib>
#include <functional>
#include <cmath>
#include <numeric>
#include <vector>

namespace {

// GCC's portable vector extension: 16 floats, one AVX-512 register (two AVX2 or four NEON ones
// where that is what -march=native offers). Plain loops only vectorise a reduction under
// -ffast-math; 64-byte loads measured faster than 32-byte ones for rows streamed from memory
// (36 vs 42 us a layer for MoNE's kept neurons, one thread of the 2-core EPYC).
typedef float vf16 __attribute__((vector_size(64)));

inline vf16 load16(const float* p) {
  vf16 v;
  __builtin_memcpy(&v, p, sizeof(v));  // unaligned load
  return v;
}

inline float hsum(vf16 v) {
  float r = 0.f;
  for (int l = 0; l < 16; ++l) r += v[l];
  return r;
}

inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  vf16 s0 = {0}, s1 = {0};  // two independent chains of adds
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    s0 += load16(a + i) * load16(b + i);
    s1 += load16(a + i + 16) * load16(b + i + 16);
  }
  for (; i + 16 <= n; i += 16) s0 += load16(a + i) * load16(b + i);
  float r = hsum(s0 + s1);
  for (; i < n; ++i) r += a[i] * b[i];
  return r;
}

// Four rows against one vector, x loaded once for the four.
inline void dot4(const float* const* rows, const float* __restrict x, int64_t n, float* out) {
  vf16 s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const vf16 xv = load16(x + i);
    s0 += load16(rows[0] + i) * xv;
    s1 += load16(rows[1] + i) * xv;
    s2 += load16(rows[2] + i) * xv;
    s3 += load16(rows[3] + i) * xv;
  }
  out[0] = hsum(s0), out[1] = hsum(s1), out[2] = hsum(s2), out[3] = hsum(s3);
  for (; i < n; ++i) {
    for (int q = 0; q < 4; ++q) out[q] += rows[q][i] * x[i];
  }
}

// y += sum_q c[q] rows[q]: y loaded and stored once for four rows.
inline void axpy4(const float* c, const float* const* rows, float* __restrict y, int64_t n) {
  const float *r0 = rows[0], *r1 = rows[1], *r2 = rows[2], *r3 = rows[3];
  for (int64_t i = 0; i < n; ++i) y[i] += c[0] * r0[i] + c[1] * r1[i] + c[2] * r2[i] + c[3] * r3[i];
}

inline void axpy(float alpha, const float* __restrict x, float* __restrict y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// Kept neurons' rows are scattered (half of an expert's rows at keep 0.5), which the hardware
// prefetcher does not follow: each jump stalls on memory. Asking for the rows ahead while the
// current one is computed hides part of that: the kept-neuron pass at keep 0.5 took 45 instead
// of 51 us a layer (SmolLM2-135M S2A2E16 shapes, 30-layer ring, one thread of the 2-core EPYC).
constexpr int64_t kAhead = 4;  // rows asked for ahead of the one computed
inline void prefetch(const float* p, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) __builtin_prefetch(p + i, 0, 1);
}

enum Activation : int64_t { kSilu = 0, kGeluTanh = 1 };
enum RouterKind : int64_t { kLinear = 0, kRepresentative = 1 };

inline float activate(float g, int64_t act) {
  if (act == kSilu) return g / (1.f + std::exp(-g));
  const float c = 0.7978845608028654f;  // sqrt(2 / pi)
  return 0.5f * g * (1.f + std::tanh(c * (g + 0.044715f * g * g * g)));
}

void check_f32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat,
              name, " must be a float32 CPU tensor, got ", t.scalar_type(), " on ", t.device());
}

// One (token, expert) choice of the layer.
struct Pair {
  int64_t token;
  int64_t expert;  // id in the stack: shared experts 0..S-1, routed S..E-1
  float gate;
};

}  // namespace

// Returns (y [T, D] fp32, top [T, k] int64 routed-expert indices, as the router gives them).
std::tuple<at::Tensor, at::Tensor> moe_decode(
    const at::Tensor& x_in,        // [T, D]
    const at::Tensor& router_w,    // [Nr, D]: linear weights, or representative gate rows
    const c10::optional<at::Tensor>& router_up,  // [Nr, D]: representative up rows
    const at::Tensor& router_b,    // [Nr]: logit intercept (linear router)
    const at::Tensor& sel_bias,    // [Nr]: selection-only bias
    const at::Tensor& scale,       // [Nr]: router scale u
    int64_t router_kind, int64_t top_k, int64_t num_shared,
    const at::Tensor& gate_up_in,  // [E, 2m, D]
    const at::Tensor& down_in,     // [E, D, m]
    const c10::optional<at::Tensor>& rows_2d_in,  // [E, m, 2D]: up row | down column (MoNE)
    c10::optional<at::IntArrayRef> keep_in,       // [E] neurons kept per expert (MoNE)
    const c10::optional<at::Tensor>& expert_bias_in,  // [Nr, D]: compensation
    int64_t activation) {
  for (auto* p : {&x_in, &router_w, &router_b, &sel_bias, &scale, &gate_up_in, &down_in}) {
    check_f32(*p, "every input of moe_decode");
  }
  const at::Tensor x = x_in.contiguous();
  const at::Tensor gate_up = gate_up_in.contiguous();
  const at::Tensor down = down_in.contiguous();
  const at::Tensor rw = router_w.contiguous();
  const at::Tensor rb = router_b.contiguous(), sb = sel_bias.contiguous(), sc = scale.contiguous();
  TORCH_CHECK(x.dim() == 2, "x must be [T, D]");
  const int64_t T = x.size(0), D = x.size(1);
  TORCH_CHECK(gate_up.dim() == 3 && gate_up.size(2) == D && gate_up.size(1) % 2 == 0,
              "gate_up must be [E, 2m, D]");
  const int64_t E = gate_up.size(0), m = gate_up.size(1) / 2;
  TORCH_CHECK(rw.dim() == 2 && rw.size(1) == D, "router_w must be [Nr, D]");
  const int64_t Nr = rw.size(0);
  TORCH_CHECK(down.dim() == 3 && down.size(0) == E && down.size(1) == D && down.size(2) == m,
              "down must be [E, D, m]");
  TORCH_CHECK(rb.numel() == Nr && sb.numel() == Nr && sc.numel() == Nr,
              "router_b, sel_bias and scale must hold Nr values");
  TORCH_CHECK(num_shared >= 0 && E == num_shared + Nr, "E must equal num_shared + routed experts");
  TORCH_CHECK(top_k >= 0 && top_k <= Nr, "top_k must be in [0, Nr]");

  // ---- route: scores = softmax(logits); top = top-k of scores + bias; gate = 1 + score * u
  at::Tensor ru;
  if (router_kind == kRepresentative) {
    TORCH_CHECK(router_up.has_value(), "a representative router needs its up rows");
    ru = router_up->contiguous();
    check_f32(ru, "router_up");
    TORCH_CHECK(ru.sizes() == rw.sizes(), "router_up must be [Nr, D] like router_w");
  }
  const float* xp = x.data_ptr<float>();
  const float* rwp = rw.data_ptr<float>();
  const float* rbp = rb.data_ptr<float>();
  const float* sbp = sb.data_ptr<float>();
  const float* scp = sc.data_ptr<float>();
  at::Tensor top = at::empty({T, top_k}, at::kLong);
  int64_t* topp = top.data_ptr<int64_t>();
  const int64_t K = num_shared + top_k;
  std::vector<Pair> pairs;
  pairs.reserve(T * K);
  std::vector<float> scores(Nr), keyed(Nr);
  std::vector<int64_t> order(Nr);
  for (int64_t t = 0; t < T; ++t) {
    const float* xt = xp + t * D;
    float mx = -INFINITY;
    for (int64_t n = 0; n < Nr; ++n) {
      float s;
      if (router_kind == kLinear) {
        s = dot(rwp + n * D, xt, D) + rbp[n];
      } else {
        const float g = dot(rwp + n * D, xt, D), u = dot(ru.data_ptr<float>() + n * D, xt, D);
        s = std::fabs(activate(g, activation) * u);
      }
      scores[n] = s;
      mx = std::max(mx, s);
    }
    float total = 0.f;
    for (int64_t n = 0; n < Nr; ++n) total += (scores[n] = std::exp(scores[n] - mx));
    for (int64_t n = 0; n < Nr; ++n) {
      keyed[n] = (scores[n] /= total) + sbp[n];
      if (std::isnan(keyed[n])) keyed[n] = INFINITY;  // as torch.topk: NaN ranks first (and
    }                                                   // the sort's ordering stays strict)
    std::iota(order.begin(), order.end(), 0);
    // Largest first, lower index first among equals: torch.topk's order.
    std::partial_sort(order.begin(), order.begin() + top_k, order.end(),
                      [&](int64_t a, int64_t b) { return keyed[a] > keyed[b] || (keyed[a] == keyed[b] && a < b); });
    for (int64_t s = 0; s < num_shared; ++s) pairs.push_back({t, s, 1.f});
    for (int64_t j = 0; j < top_k; ++j) {
      const int64_t n = order[j];
      topp[t * top_k + j] = n;
      pairs.push_back({t, num_shared + n, 1.f + scores[n] * scp[n]});
    }
  }

  // ---- experts, grouped: every row of an expert is read once for all tokens that chose it
  std::vector<std::vector<int64_t>> by_expert(E);
  for (int64_t p = 0; p < (int64_t)pairs.size(); ++p) by_expert[pairs[p].expert].push_back(p);
  std::vector<int64_t> used;
  for (int64_t e = 0; e < E; ++e) if (!by_expert[e].empty()) used.push_back(e);

  std::vector<int64_t> keep(E, m);
  bool select = false;
  if (keep_in.has_value()) {
    TORCH_CHECK((int64_t)keep_in->size() == E, "keep must hold one count per expert");
    for (int64_t e = 0; e < E; ++e) {
      keep[e] = (*keep_in)[e];
      TORCH_CHECK(keep[e] >= 1 && keep[e] <= m, "keep counts must be in [1, m]");
      select = select || keep[e] < m;
    }
  }
  // Experts whose kept neurons are read row by row: those that select neurons and serve one
  // token of this call. An expert several tokens chose is read whole, once, and masked: their
  // kept sets differ, and reading each token's rows separately re-read most of the expert
  // (batch-4 decode at keep 0.5 ran 10% slower than without selection).
  std::vector<char> by_row(E, 0);
  for (int64_t e = 0; e < E; ++e) by_row[e] = keep[e] < m && by_expert[e].size() == 1;
  at::Tensor rows_2d;  // a kept neuron's down column is strided in [E, D, m]: read it here
  if (select) {
    TORCH_CHECK(rows_2d_in.has_value(), "neuron selection needs rows_2d [E, m, 2D]");
    rows_2d = rows_2d_in->contiguous();
    check_f32(rows_2d, "rows_2d");
    TORCH_CHECK(rows_2d.size(0) == E && rows_2d.size(1) == m && rows_2d.size(2) == 2 * D,
                "rows_2d must be [E, m, 2D]");
  }

  const float* gup = gate_up.data_ptr<float>();
  const int64_t P = pairs.size();
  std::vector<float> h(P * 2 * m, 0.f);  // per pair: gate pre-activations, then up
  // Gate rows of every used expert, and its up rows when it keeps every neuron: each row is
  // read once for all the tokens that chose the expert.
  std::vector<std::pair<int64_t, int64_t>> items;  // (expert, row)
  for (int64_t e : used) {
    const int64_t rows = by_row[e] ? m : 2 * m;
    for (int64_t r = 0; r < rows; ++r) items.emplace_back(e, r);
  }
  at::parallel_for(0, items.size(), 16, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const auto [e, r] = items[i];
      const float* row = gup + (e * 2 * m + r) * D;
      for (int64_t p : by_expert[e]) h[p * 2 * m + r] = dot(row, xp + pairs[p].token * D, D);
    }
  });

  // Hidden activations a = act(gate) * up * expert gate; MoNE keeps the largest |act(gate)|.
  std::vector<float> a(P * m, 0.f);
  std::vector<std::pair<int64_t, int64_t>> neurons;  // kept (pair, neuron) of selecting experts
  std::vector<float> mag(m), order_mag(m);
  if (select) neurons.reserve(P * m);
  for (int64_t p = 0; p < P; ++p) {
    const int64_t e = pairs[p].expert;
    float* hp = h.data() + p * 2 * m;
    float* ap = a.data() + p * m;
    const float g = pairs[p].gate;
    for (int64_t j = 0; j < m; ++j) hp[j] = activate(hp[j], activation);
    if (keep[e] == m) {
      for (int64_t j = 0; j < m; ++j) ap[j] = hp[j] * hp[m + j] * g;
      continue;
    }
    // The keep[e]-th largest |act| as a threshold, then one forward pass: the kept neurons come
    // out in ascending order (forward reads) without sorting indices.
    for (int64_t j = 0; j < m; ++j) mag[j] = std::isnan(hp[j]) ? INFINITY : std::fabs(hp[j]);
    std::copy(mag.begin(), mag.end(), order_mag.begin());
    std::nth_element(order_mag.begin(), order_mag.begin() + (keep[e] - 1), order_mag.end(),
                     std::greater<float>());
    const float threshold = order_mag[keep[e] - 1];
    int64_t ties = keep[e];  // how many at the threshold still fit: the lowest indices win
    for (int64_t j = 0; j < m; ++j) ties -= mag[j] > threshold;
    for (int64_t j = 0; j < m; ++j) {
      const bool kept = mag[j] > threshold || (mag[j] == threshold && ties-- > 0);
      if (!by_row[e]) {
        ap[j] = kept ? hp[j] * hp[m + j] * g : 0.f;  // whole expert read: mask
      } else if (kept) {
        neurons.emplace_back(p, j);
      }
    }
  }

  // Kept neurons, one pass each over its up row and down column, adjacent in rows_2d (4.6 KB
  // at D = 576): up . x gives the hidden value, which scales the down column into the output.
  // Chunks of neurons, one per thread, sum into their own output rows, added up below. (Slots
  // by chunk, not by thread id: the id comes from whichever OpenMP runtime the build linked.)
  const int64_t N = neurons.size();
  const int64_t chunks = N == 0 ? 0 : std::min<int64_t>(at::get_num_threads(), (N + 7) / 8);
  std::vector<float> partial(chunks * T * D, 0.f);
  if (chunks > 0) {
    const float* r2p = rows_2d.data_ptr<float>();
    auto row_of = [&](int64_t i) {
      return r2p + (pairs[neurons[i].first].expert * m + neurons[i].second) * 2 * D;
    };
    // Neurons lo..hi-1 summed into `out` [T, D].
    auto run_neurons = [&](int64_t lo, int64_t hi, float* out) {
      int64_t i = lo;
      while (i < hi) {
        const int64_t t = pairs[neurons[i].first].token;
        // Four neurons of one token at once: a quarter of the loads and stores of x and the
        // output row, 44 -> 36 us a layer at keep 0.5 (one thread, weights from memory).
        if (i + 4 <= hi && pairs[neurons[i + 3].first].token == t) {
          for (int64_t q = i + kAhead; q < std::min(i + kAhead + 4, hi); ++q) prefetch(row_of(q), 2 * D);
          const float* up[4] = {row_of(i), row_of(i + 1), row_of(i + 2), row_of(i + 3)};
          const float* dn[4] = {up[0] + D, up[1] + D, up[2] + D, up[3] + D};
          float coef[4];
          dot4(up, xp + t * D, D, coef);
          for (int q = 0; q < 4; ++q) {
            const auto [p, j] = neurons[i + q];
            coef[q] *= h[p * 2 * m + j] * pairs[p].gate;
          }
          axpy4(coef, dn, out + t * D, D);
          i += 4;
          continue;
        }
        if (i + kAhead < hi) prefetch(row_of(i + kAhead), 2 * D);
        const auto [p, j] = neurons[i];
        const float* row = row_of(i);
        const float hidden = h[p * 2 * m + j] * dot(row, xp + t * D, D) * pairs[p].gate;
        axpy(hidden, row + D, out + t * D, D);
        ++i;
      }
    };
    at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
      for (int64_t chunk = first; chunk < last; ++chunk) {
        run_neurons(N * chunk / chunks, N * (chunk + 1) / chunks, partial.data() + chunk * T * D);
      }
    });
  }

  // ---- down projections of experts kept whole, the neurons' partial sums, compensation
  at::Tensor y = at::zeros({T, D}, at::kFloat);
  float* yp = y.data_ptr<float>();
  const float* dnp = down.data_ptr<float>();
  at::Tensor eb;
  const float* ebp = nullptr;
  if (expert_bias_in.has_value()) {
    eb = expert_bias_in->contiguous();
    check_f32(eb, "expert_bias");
    TORCH_CHECK(eb.dim() == 2 && eb.size(0) == Nr && eb.size(1) == D, "expert_bias must be [Nr, D]");
    ebp = eb.data_ptr<float>();
  }
  std::vector<char> chosen(T * Nr, 0);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < top_k; ++j) chosen[t * Nr + topp[t * top_k + j]] = 1;
  at::parallel_for(0, D, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t e : used) {
      if (by_row[e]) continue;
      for (int64_t d = lo; d < hi; ++d) {
        const float* row = dnp + (e * D + d) * m;
        for (int64_t p : by_expert[e]) yp[pairs[p].token * D + d] += dot(row, a.data() + p * m, m);
      }
    }
    for (int64_t th = 0; th < chunks; ++th)
      for (int64_t t = 0; t < T; ++t)
        axpy(1.f, partial.data() + (th * T + t) * D + lo, yp + t * D + lo, hi - lo);
    if (ebp != nullptr) {  // mean output of each routed expert the token left out
      for (int64_t t = 0; t < T; ++t)
        for (int64_t n = 0; n < Nr; ++n)
          if (!chosen[t * Nr + n]) axpy(1.f, ebp + n * D + lo, yp + t * D + lo, hi - lo);
    }
  });
  return {y, top};
}

// An uninitialised float32 tensor in 2 MiB-aligned memory that asks the kernel for huge pages
// (madvise MADV_HUGEPAGE, best effort), its storage exactly the tensor's bytes: weights copied
// here read with far fewer TLB misses (see cpu_decode.hugepage_copy for the figures).
at::Tensor hugepage_empty(at::IntArrayRef sizes) {
  constexpr size_t kHuge = size_t(2) << 20;
  int64_t numel = 1;
  for (int64_t s : sizes) {
    TORCH_CHECK(s >= 0, "sizes must be non-negative");
    numel *= s;
  }
  const size_t bytes = std::max<size_t>(numel * sizeof(float), 1);
  const size_t padded = (bytes + kHuge - 1) / kHuge * kHuge;
  void* ptr = nullptr;
  TORCH_CHECK(posix_memalign(&ptr, kHuge, padded) == 0, "out of memory allocating ", padded, " bytes");
  madvise(ptr, padded, MADV_HUGEPAGE);  // may fail (THP off): ordinary pages then
  return at::from_blob(ptr, sizes, [](void* p) { std::free(p); }, at::TensorOptions().dtype(at::kFloat));
}

TORCH_LIBRARY(cmoe_cpu, m) {
  m.def("hugepage_empty(int[] sizes) -> Tensor", &hugepage_empty);
  m.def(
      "moe_decode(Tensor x, Tensor router_w, Tensor? router_up, Tensor router_b, Tensor sel_bias, "
      "Tensor scale, int router_kind, int top_k, int num_shared, Tensor gate_up, Tensor down, "
      "Tensor? rows_2d, int[]? keep, Tensor? expert_bias, int activation) -> (Tensor, Tensor)");
  m.impl("moe_decode", c10::DispatchKey::CPU, TORCH_FN(moe_decode));
}
