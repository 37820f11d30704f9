// rmn's fused batch-1 inference ops (rmn.fused): a routed stage's route and its Conditional Attention, each as one
// C++ call. Between convolutions each small torch op costs 5-10x what it costs alone (BENCHMARKS.md), so at batch 1
// these two calls replace about twenty. CPU, float32, contiguous [1, C, H, W] only; rmn.fused checks the rest.
// The sums are vectorised (omp simd reductions), so they round differently from torch's: close, not bit-equal.
#include <torch/extension.h>

#include <cmath>
#include <vector>

// GAP of x, then argmin_n ||m_n||^2 - 2 f.m_n (rmn.memory.nearest's formula), in one pass.
int64_t fused_route(torch::Tensor x, torch::Tensor mem, torch::Tensor sq) {
  const float* xp = x.data_ptr<float>();
  const int64_t C = x.size(1), HW = x.size(2) * x.size(3), N = mem.size(0);
  const float* mp = mem.data_ptr<float>();
  const float* sp = sq.data_ptr<float>();
  std::vector<float> f(C);
  for (int64_t c = 0; c < C; ++c) {
    float s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < HW; ++i) s += xp[c * HW + i];
    f[c] = s / HW;
  }
  int64_t best = 0;
  float best_d = 0;
  for (int64_t n = 0; n < N; ++n) {
    float dot = 0;
#pragma omp simd reduction(+ : dot)
    for (int64_t c = 0; c < C; ++c) dot += f[c] * mp[n * C + c];
    const float d = sp[n] - 2 * dot;
    if (n == 0 || d < best_d) { best_d = d; best = n; }
  }
  return best;
}

// y * sigmoid(W_up [relu(W_down GAP(y) + b_down); onehot(route)] + b_up) (rmn.attention.ConditionalAttention).
torch::Tensor fused_ca(torch::Tensor y, torch::Tensor w_down, torch::Tensor b_down, torch::Tensor w_up,
                       torch::Tensor b_up, int64_t route) {
  const int64_t C = y.size(1), HW = y.size(2) * y.size(3), H = w_down.size(0), K = w_up.size(1);
  const float* yp = y.data_ptr<float>();
  const float* wd = w_down.data_ptr<float>();
  const float* bd = b_down.data_ptr<float>();
  const float* wu = w_up.data_ptr<float>();
  const float* bu = b_up.data_ptr<float>();
  std::vector<float> g(C), z(H);
  for (int64_t c = 0; c < C; ++c) {
    float s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < HW; ++i) s += yp[c * HW + i];
    g[c] = s / HW;
  }
  for (int64_t h = 0; h < H; ++h) {
    float s = bd[h];
#pragma omp simd reduction(+ : s)
    for (int64_t c = 0; c < C; ++c) s += wd[h * C + c] * g[c];
    z[h] = s > 0 ? s : 0;
  }
  torch::Tensor out = torch::empty_like(y);
  float* op = out.data_ptr<float>();
  for (int64_t c = 0; c < C; ++c) {
    float s = bu[c] + wu[c * K + H + route];
    for (int64_t h = 0; h < H; ++h) s += wu[c * K + h] * z[h];
    const float gate = 1.f / (1.f + std::exp(-s));
    for (int64_t i = 0; i < HW; ++i) op[c * HW + i] = yp[c * HW + i] * gate;
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fused_route", &fused_route, "GAP + nearest memory of one sample");
  m.def("fused_ca", &fused_ca, "Conditional Attention of one sample");
}
