// DynamicQuantizePerToken and the per-row int8 quantizer shared with MixedInt8MatMul.
// The math and the rounding/clipping conventions are specified in reference.py.
#include "common.h"

#include <algorithm>
#include <cmath>

namespace outlierquant {
namespace {

// 1.5 * 2^23: adding then subtracting it rounds a float with |v| < 2^22 to the nearest
// integer, ties to even, in the default IEEE rounding mode (and vectorizes, unlike nearbyint).
constexpr float kRoundMagic = 12582912.0f;

// Written so that a NaN fails the first comparison and becomes 127: the result is then
// always in range for the float-to-int conversion.
inline float ClipRound(float value) {
  value = value < 127.0f ? value : 127.0f;
  value = value > -127.0f ? value : -127.0f;
  return (value + kRoundMagic) - kRoundMagic;
}

}  // namespace

OUTLIERQUANT_MULTIVERSION
float RowScale(const float* row, int64_t count) {
  // Eight independent running maxima so the loop vectorizes without -ffast-math.
  float lane_max[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    for (int lane = 0; lane < 8; ++lane) {
      const float magnitude = std::fabs(row[i + lane]);
      lane_max[lane] = magnitude > lane_max[lane] ? magnitude : lane_max[lane];
    }
  }
  for (; i < count; ++i) {
    const float magnitude = std::fabs(row[i]);
    lane_max[0] = magnitude > lane_max[0] ? magnitude : lane_max[0];
  }
  float max_abs = 0.0f;
  for (float value : lane_max) max_abs = value > max_abs ? value : max_abs;
  const float scale = max_abs / 127.0f;
  return scale == 0.0f ? 1.0f : scale;
}

OUTLIERQUANT_MULTIVERSION
void QuantizeRowInt8(const float* row, int64_t count, float scale, int8_t* out) {
  for (int64_t i = 0; i < count; ++i) {
    out[i] = static_cast<int8_t>(static_cast<int32_t>(ClipRound(row[i] / scale)));
  }
}

OUTLIERQUANT_MULTIVERSION
void QuantizeRowUint8(const float* row, int64_t count, float scale, uint8_t* out) {
  for (int64_t i = 0; i < count; ++i) {
    out[i] = static_cast<uint8_t>(static_cast<int32_t>(ClipRound(row[i] / scale)) + 128);
  }
}

namespace {

constexpr ArgSpec kInputs[] = {{"X", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, false}};
// Both outputs are optional: a node may ask for only the codes or only the scales.
constexpr ArgSpec kOutputs[] = {{"Q", ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8, true},
                                {"scale", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, true}};

struct DynamicQuantizePerToken : GuardedKernel<DynamicQuantizePerToken> {
  static constexpr OpSpec kSpec{"DynamicQuantizePerToken", kInputs, 1, kOutputs, 2};

  explicit DynamicQuantizePerToken(const OrtKernelInfo*) {}

  void Compute(KernelIo& io) {
    const TensorView<float> input = io.RequiredInput<float>(0);
    const std::vector<int64_t>& shape = input.shape;
    if (shape.empty()) throw KernelError("input 0 (X) must have rank >= 1, got a scalar");
    const int64_t row_size = shape.back();
    std::vector<int64_t> scale_shape = shape;
    scale_shape.back() = 1;
    const int64_t rows = ElementCount(scale_shape);
    int8_t* q = io.Output<int8_t>(0, shape);
    float* s = io.Output<float>(1, scale_shape);
    if (rows == 0 || (q == nullptr && s == nullptr)) return;
    if (row_size == 0) {
      if (s != nullptr) std::fill(s, s + rows, 1.0f);
      return;
    }
    const float* x = input.data;
    ParallelRows(io.context(), rows, row_size, 1 << 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const float* row = x + r * row_size;
        const float scale = RowScale(row, row_size);
        if (s != nullptr) s[r] = scale;
        if (q != nullptr) QuantizeRowInt8(row, row_size, scale, q + r * row_size);
      }
    });
  }
};

}  // namespace

const OrtCustomOp* DynamicQuantizePerTokenOp() {
  // never destroyed: sessions may outlive static teardown
  static const auto* op = new OpDef<DynamicQuantizePerToken>();
  return op;
}

}  // namespace outlierquant
