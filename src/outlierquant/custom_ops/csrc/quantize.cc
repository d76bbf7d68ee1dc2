// DynamicQuantizePerToken and the per-row int8 quantizer shared with MixedInt8MatMul.
// The math and the rounding/clipping conventions are specified in reference.py.
#include "common.h"

#include <cmath>

namespace outlierquant {
namespace {

// 1.5 * 2^23: adding then subtracting it rounds a float with |v| < 2^22 to the nearest
// integer, ties to even, in the default IEEE rounding mode (and vectorizes, unlike nearbyint).
constexpr float kRoundMagic = 12582912.0f;

inline float ClipRound(float value) {
  value = value > 127.0f ? 127.0f : value;
  value = value < -127.0f ? -127.0f : value;
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

struct DynamicQuantizePerToken {
  DynamicQuantizePerToken(const OrtApi*, const OrtKernelInfo*) {}

  Ort::Status Compute(OrtKernelContext* context, const Ort::Custom::Tensor<float>& input,
                      Ort::Custom::Tensor<int8_t>& quantized, Ort::Custom::Tensor<float>& scales) {
    const std::vector<int64_t>& shape = input.Shape();
    if (shape.empty()) {
      return InvalidArgument("DynamicQuantizePerToken: input must have rank >= 1, got a scalar");
    }
    const int64_t row_size = shape.back();
    std::vector<int64_t> scale_shape = shape;
    scale_shape.back() = 1;
    int8_t* q = quantized.Allocate(shape);
    float* s = scales.Allocate(scale_shape);
    const int64_t rows = row_size > 0 ? ElementCount(shape) / row_size : ElementCount(scale_shape);
    const float* x = input.Data();
    if (row_size == 0) {
      for (int64_t r = 0; r < rows; ++r) s[r] = 1.0f;
      return Ort::Status{nullptr};
    }
    ParallelRows(context, rows, row_size, 1 << 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const float* row = x + r * row_size;
        s[r] = RowScale(row, row_size);
        QuantizeRowInt8(row, row_size, s[r], q + r * row_size);
      }
    });
    return Ort::Status{nullptr};
  }
};

}  // namespace

Ort::Custom::OrtLiteCustomOp* MakeDynamicQuantizePerTokenOp() {
  return Ort::Custom::CreateLiteCustomOp<DynamicQuantizePerToken>("DynamicQuantizePerToken", kCpuProvider);
}

}  // namespace outlierquant
