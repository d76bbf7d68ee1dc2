// DynamicQuantizePerToken and the per-row int8 quantizer shared with MixedInt8MatMul.
// The math and the rounding/clipping conventions are specified in reference.py.
#include "common.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

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
  // max |x| over the row's bit patterns: with the sign bit cleared, finite floats and
  // infinities order like their bits read as unsigned integers, and an integer max
  // reduction vectorizes without -ffast-math (a float max does not: it must keep NaN
  // semantics). NaN patterns (above infinity's) count as 0, as a NaN never won the float
  // comparison this replaces; the result is the same float, bit for bit.
  // Signed: the masked patterns are non-negative, and a signed max vectorizes on every ISA
  // (an unsigned one needs SSE4.1).
  constexpr int32_t kMagnitude = 0x7fffffff;
  constexpr int32_t kInfinity = 0x7f800000;
  int32_t max_bits = 0;
  for (int64_t i = 0; i < count; ++i) {
    int32_t bits;
    std::memcpy(&bits, row + i, sizeof(bits));
    bits &= kMagnitude;
    bits = bits > kInfinity ? 0 : bits;
    max_bits = max_bits > bits ? max_bits : bits;
  }
  float max_abs;
  std::memcpy(&max_abs, &max_bits, sizeof(max_abs));
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
// Every output is optional: a node may ask for only the codes or only the scales. Q_u8 is
// Q + 128 as uint8, the activation layout of onnxruntime's u8 x s8 integer GEMMs: a
// following MatMulIntegerToFloat (zero point 128) then runs on its prepacked constant
// weight, which an op invoked from inside a custom kernel cannot do.
constexpr ArgSpec kOutputs[] = {{"Q", ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8, true},
                                {"scale", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, true},
                                {"Q_u8", ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, true}};

struct DynamicQuantizePerToken : GuardedKernel<DynamicQuantizePerToken> {
  static constexpr OpSpec kSpec{"DynamicQuantizePerToken", kInputs, 1, kOutputs, 3};

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
    uint8_t* q_u8 = io.Output<uint8_t>(2, shape);
    if (rows == 0 || (q == nullptr && s == nullptr && q_u8 == nullptr)) return;
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
        if (q_u8 != nullptr) QuantizeRowUint8(row, row_size, scale, q_u8 + r * row_size);
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
