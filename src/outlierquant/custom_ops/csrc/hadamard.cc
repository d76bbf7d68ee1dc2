// HadamardTransform: out = x @ (M ⊗ H_n / sqrt(n)) over the last axis, d = m * n, n = 2^k.
// The convention (block-major layout, Sylvester H_n, M applied from the left of each
// column of blocks) is specified in reference.py; this kernel must agree with it.
#include "common.h"

#include <cmath>

namespace outlierquant {
namespace {

bool IsPowerOfTwo(int64_t value) { return value > 0 && (value & (value - 1)) == 0; }

inline void Butterfly8(const float* in, float* out) {
  const float a0 = in[0] + in[1], a1 = in[0] - in[1], a2 = in[2] + in[3], a3 = in[2] - in[3];
  const float a4 = in[4] + in[5], a5 = in[4] - in[5], a6 = in[6] + in[7], a7 = in[6] - in[7];
  const float b0 = a0 + a2, b1 = a1 + a3, b2 = a0 - a2, b3 = a1 - a3;
  const float b4 = a4 + a6, b5 = a5 + a7, b6 = a4 - a6, b7 = a5 - a7;
  out[0] = b0 + b4, out[1] = b1 + b5, out[2] = b2 + b6, out[3] = b3 + b7;
  out[4] = b0 - b4, out[5] = b1 - b5, out[6] = b2 - b6, out[7] = b3 - b7;
}

// out = scale * H_n @ in for one length-n block (Sylvester order). The stages of the
// transform commute; the three with stride < 8 run in registers (Butterfly8), the rest
// two at a time (radix 4) over contiguous runs the compiler vectorizes, and the scale
// is applied in the last pass.
OUTLIERQUANT_MULTIVERSION
void ScaledWalshHadamard(const float* __restrict in, float* __restrict out, int64_t n, float scale) {
  int64_t half = 1;
  if (n >= 8) {
    for (int64_t i = 0; i < n; i += 8) Butterfly8(in + i, out + i);
    half = 8;
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = in[i];
  }
  int64_t stages = 0;
  for (int64_t h = half; h < n; h *= 2) ++stages;
  if (stages == 0) {
    for (int64_t i = 0; i < n; ++i) out[i] *= scale;
    return;
  }
  if (stages % 2 == 1) {
    const float s = stages == 1 ? scale : 1.0f;
    for (int64_t start = 0; start < n; start += 2 * half) {
      float* __restrict p0 = out + start;
      float* __restrict p1 = p0 + half;
      for (int64_t j = 0; j < half; ++j) {
        const float a = p0[j], b = p1[j];
        p0[j] = (a + b) * s;
        p1[j] = (a - b) * s;
      }
    }
    half *= 2;
    stages -= 1;
  }
  for (; stages > 0; stages -= 2, half *= 4) {
    const float s = stages == 2 ? scale : 1.0f;
    for (int64_t start = 0; start < n; start += 4 * half) {
      float* __restrict p0 = out + start;
      float* __restrict p1 = p0 + half;
      float* __restrict p2 = p1 + half;
      float* __restrict p3 = p2 + half;
      for (int64_t j = 0; j < half; ++j) {
        const float a = p0[j], b = p1[j], c = p2[j], d = p3[j];
        const float sum_ab = a + b, diff_ab = a - b, sum_cd = c + d, diff_cd = c - d;
        p0[j] = (sum_ab + sum_cd) * s;
        p1[j] = (diff_ab + diff_cd) * s;
        p2[j] = (sum_ab - sum_cd) * s;
        p3[j] = (diff_ab - diff_cd) * s;
      }
    }
  }
}

// out block b' = sum_b mix[b, b'] * in block b, for m blocks of length n.
OUTLIERQUANT_MULTIVERSION
void MixBlocks(const float* __restrict in, const float* __restrict mix, float* __restrict out, int64_t m,
               int64_t n) {
  for (int64_t out_b = 0; out_b < m; ++out_b) {
    float* __restrict dst = out + out_b * n;
    const float first = mix[out_b];
    for (int64_t j = 0; j < n; ++j) dst[j] = first * in[j];
    for (int64_t in_b = 1; in_b < m; ++in_b) {
      const float weight = mix[in_b * m + out_b];
      const float* __restrict src = in + in_b * n;
      for (int64_t j = 0; j < n; ++j) dst[j] += weight * src[j];
    }
  }
}

constexpr ArgSpec kInputs[] = {{"X", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, false},
                               {"block", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, true}};
constexpr ArgSpec kOutputs[] = {{"Y", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, false}};

struct HadamardTransform : GuardedKernel<HadamardTransform> {
  static constexpr OpSpec kSpec{"HadamardTransform", kInputs, 2, kOutputs, 1};

  explicit HadamardTransform(const OrtKernelInfo*) {}

  void Compute(KernelIo& io) {
    const TensorView<float> input = io.RequiredInput<float>(0);
    const std::optional<TensorView<float>> block = io.Input<float>(1);
    const std::vector<int64_t>& shape = input.shape;
    if (shape.empty()) throw KernelError("input 0 (X) must have rank >= 1, got a scalar");
    const int64_t dim = shape.back();
    int64_t block_size = 1;
    const float* mix = nullptr;
    if (block) {
      const std::vector<int64_t>& block_shape = block->shape;
      if (block_shape.size() != 2 || block_shape[0] != block_shape[1] || block_shape[0] < 1) {
        throw KernelError("input 1 (block) must be a square m x m matrix with m >= 1, got shape " +
                          ShapeToString(block_shape));
      }
      block_size = block_shape[0];
      mix = block->data;
    }
    if (dim <= 0 || dim % block_size != 0 || !IsPowerOfTwo(dim / block_size)) {
      throw KernelError("last dimension " + std::to_string(dim) + " is not m * 2^k for block size m = " +
                        std::to_string(block_size) +
                        "; supported sizes are powers of two, or m * 2^k with an m x m `block` input");
    }
    const int64_t n = dim / block_size;
    const float norm = static_cast<float>(1.0 / std::sqrt(static_cast<double>(n)));
    const int64_t rows = ElementCount(shape) / dim;
    float* y = io.Output<float>(0, shape);
    if (rows == 0) return;
    const float* x = input.data;

    int64_t log_n = 0;
    while ((int64_t{1} << log_n) < n) ++log_n;
    const int64_t work_per_row = dim * (log_n + block_size + 1);
    ParallelRows(io.context(), rows, work_per_row, 1 << 17, [&](int64_t begin, int64_t end) {
      std::vector<float> scratch(mix != nullptr ? static_cast<size_t>(dim) : 0);
      for (int64_t r = begin; r < end; ++r) {
        const float* src = x + r * dim;
        float* dst = y + r * dim;
        if (mix == nullptr) {
          ScaledWalshHadamard(src, dst, n, norm);
          continue;
        }
        for (int64_t b = 0; b < block_size; ++b) ScaledWalshHadamard(src + b * n, scratch.data() + b * n, n, norm);
        MixBlocks(scratch.data(), mix, dst, block_size, n);
      }
    });
  }
};

}  // namespace

const OrtCustomOp* HadamardTransformOp() {
  // never destroyed: sessions may outlive static teardown
  static const auto* op = new OpDef<HadamardTransform>();
  return op;
}

}  // namespace outlierquant
