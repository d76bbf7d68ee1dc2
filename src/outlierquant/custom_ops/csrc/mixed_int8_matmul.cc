// MixedInt8MatMul: the LLM.int8() decomposition (Dettmers et al. 2022).
//
// Outlier input channels (static list + optional runtime threshold) are multiplied in
// float; every other channel is quantized per token to int8 and multiplied by onnxruntime's
// own com.microsoft::MatMulIntegerToFloat (MLAS u8 x s8), invoked from inside this kernel.
// Inputs, attributes and the exact arithmetic are specified in reference.py.
//
// On an x86 CPU without VNNI, MLAS multiplies u8 x s8 with vpmaddubsw, which saturates each
// pair sum at int16 (255 * 127 * 2 > 32767): the kernel then hands MLAS the weights as
// uint8 (+128, zero point 128), whose u8 x u8 kernels widen before multiplying. Same
// integers, exact either way (numerics/int8.py explains the same choice for the graph forms).
#include "common.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#endif

namespace outlierquant {
namespace {

constexpr int64_t kChunkOutputBytes = int64_t{4} << 20;
constexpr int64_t kMinChunkRows = 256;

OUTLIERQUANT_MULTIVERSION
void ScaleInPlace(float* __restrict y, float scale, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] *= scale;
}

OUTLIERQUANT_MULTIVERSION
void AddScaled(float* __restrict y, const float* __restrict x, float alpha, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

OUTLIERQUANT_MULTIVERSION
void MaskRow(const float* __restrict row, const uint8_t* __restrict is_outlier, float* __restrict out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = is_outlier[i] ? 0.0f : row[i];
}

// Whether MLAS's u8 x s8 GEMM saturates here: x86-64 without a usable VNNI (AVX512-VNNI with
// the OS saving zmm state, or AVX-VNNI with ymm state). OUTLIERQUANT_INT8_WEIGHTS=signed or
// =unsigned overrides the detection (tests run both paths on any CPU).
bool UnsignedWeightsNeeded() {
  const char* forced = std::getenv("OUTLIERQUANT_INT8_WEIGHTS");
  if (forced != nullptr && std::string(forced) == "unsigned") return true;
  if (forced != nullptr && std::string(forced) == "signed") return false;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool saturates = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !((c >> 27) & 1)) return true;  // no OSXSAVE: no AVX at all
    unsigned xcr0_low = 0, xcr0_high = 0;
    __asm__ volatile("xgetbv" : "=a"(xcr0_low), "=d"(xcr0_high) : "c"(0));
    const bool ymm = (xcr0_low & 0x6u) == 0x6u;
    const bool zmm = (xcr0_low & 0xE6u) == 0xE6u;
    bool avx512_vnni = false, avx_vnni = false;
    if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) avx512_vnni = (c >> 11) & 1;
    if (__get_cpuid_count(7, 1, &a, &b, &c, &d)) avx_vnni = (a >> 4) & 1;
    return !((avx512_vnni && zmm) || (avx_vnni && ymm));
  }();
  return saturates;
#else
  return false;
#endif
}

constexpr ArgSpec kInputs[] = {{"X", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, false},
                               {"W_q", ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8, false},
                               {"w_scale", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, false},
                               {"outlier_channels", ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, true},
                               {"W_outlier", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, true}};
constexpr ArgSpec kOutputs[] = {{"Y", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, false}};

struct MixedInt8MatMul : GuardedKernel<MixedInt8MatMul> {
  static constexpr OpSpec kSpec{"MixedInt8MatMul", kInputs, 5, kOutputs, 1};

  explicit MixedInt8MatMul(const OrtKernelInfo* info)
      : memory_info_(Ort::MemoryInfo::CreateCpu(OrtDeviceAllocator, OrtMemTypeDefault)),
        integer_matmul_(nullptr),
        unit_scale_(nullptr),
        zero_point_(nullptr) {
    // absent: 0, no runtime outlier detection
    threshold_ = OptionalFloatAttribute(info, "threshold").value_or(0.0f);
    if (!std::isfinite(threshold_) || threshold_ < 0.0f) {
      throw KernelError("attribute 'threshold' must be a finite float >= 0 (0 turns runtime outliers off), got " +
                        std::to_string(threshold_));
    }

    unsigned_weights_ = UnsignedWeightsNeeded();
    const char* type_names[] = {"T1", "T2", "T3"};
    const ONNXTensorElementDataType type_values[] = {
        ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8,
        unsigned_weights_ ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8,
        ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};
    // Inputs: A (uint8), B (int8, or uint8 + its zero point), a_scale, b_scale, a_zero_point[, b_zero_point].
    integer_matmul_ = Ort::Op::Create(info, "MatMulIntegerToFloat", "com.microsoft", 1, type_names,
                                      type_values, 3, nullptr, 0, unsigned_weights_ ? 6 : 5, 1);
    if (unsigned_weights_) {
      int is_constant = 0;
      Ort::ConstValue weight = Ort::ConstKernelInfo(info).GetTensorConstantInput(1, &is_constant);
      if (is_constant && weight) {
        const size_t count = weight.GetTensorTypeAndShapeInfo().GetElementCount();
        constant_codes_.resize(count);
        ToUnsigned(weight.GetTensorData<int8_t>(), static_cast<int64_t>(count), constant_codes_.data());
      }
    }
    unit_scale_ = Ort::Value::CreateTensor<float>(memory_info_, &unit_scale_value_, 1, nullptr, 0);
    zero_point_ = Ort::Value::CreateTensor<uint8_t>(memory_info_, &zero_point_value_, 1, nullptr, 0);
  }

  void Compute(KernelIo& io) {
    const TensorView<float> input = io.RequiredInput<float>(0);
    const TensorView<int8_t> weight_q = io.RequiredInput<int8_t>(1);
    const TensorView<float> weight_scale = io.RequiredInput<float>(2);
    const std::optional<TensorView<int64_t>> outlier_channels = io.Input<int64_t>(3);
    const std::optional<TensorView<float>> outlier_weight = io.Input<float>(4);

    const std::vector<int64_t>& x_shape = input.shape;
    const std::vector<int64_t>& w_shape = weight_q.shape;
    if (x_shape.empty()) throw KernelError("input 0 (X) must have rank >= 1, got a scalar");
    if (w_shape.size() != 2 || w_shape[0] != x_shape.back()) {
      throw KernelError("input 1 (W_q) must be [K, N] with K = X.shape[-1] = " + std::to_string(x_shape.back()) +
                        ", got " + ShapeToString(w_shape));
    }
    const int64_t k_dim = w_shape[0];
    const int64_t n_dim = w_shape[1];
    if (weight_scale.shape != std::vector<int64_t>{n_dim}) {
      throw KernelError("input 2 (w_scale) must be [N] = [" + std::to_string(n_dim) + "], got " +
                        ShapeToString(weight_scale.shape));
    }

    std::vector<int64_t> static_channels;
    if (outlier_channels) {
      const std::vector<int64_t>& idx_shape = outlier_channels->shape;
      if (idx_shape.size() != 1) {
        throw KernelError("input 3 (outlier_channels) must be 1-D, got shape " + ShapeToString(idx_shape));
      }
      if (idx_shape[0] > k_dim) {
        throw KernelError("input 3 (outlier_channels) lists " + std::to_string(idx_shape[0]) +
                          " channels, more than K = " + std::to_string(k_dim));
      }
      if (idx_shape[0] > 0) static_channels.assign(outlier_channels->data, outlier_channels->data + idx_shape[0]);
    }
    const int64_t n_static = static_cast<int64_t>(static_channels.size());
    std::vector<uint8_t> is_outlier(static_cast<size_t>(k_dim), 0);
    for (int64_t channel : static_channels) {
      if (channel < 0 || channel >= k_dim) {
        throw KernelError("input 3 (outlier_channels): channel " + std::to_string(channel) +
                          " is out of range [0, " + std::to_string(k_dim) + ")");
      }
      if (is_outlier[channel]) {
        throw KernelError("input 3 (outlier_channels): channel " + std::to_string(channel) + " is listed twice");
      }
      is_outlier[channel] = 1;
    }
    const float* w_outlier = nullptr;
    if (outlier_weight) {
      if (outlier_weight->shape != std::vector<int64_t>{n_static, n_dim}) {
        throw KernelError("input 4 (W_outlier) must be [n_outliers, N] = [" + std::to_string(n_static) + ", " +
                          std::to_string(n_dim) + "] for the " + std::to_string(n_static) +
                          " channels of input 3 (outlier_channels), got " + ShapeToString(outlier_weight->shape));
      }
      w_outlier = outlier_weight->data;
    } else if (n_static > 0) {
      throw KernelError("input 4 (W_outlier) is required when input 3 (outlier_channels) is not empty");
    }

    std::vector<int64_t> y_shape = x_shape;
    y_shape.back() = n_dim;
    std::vector<int64_t> row_shape(x_shape.begin(), x_shape.end() - 1);
    const int64_t rows = ElementCount(row_shape);
    float* y = io.Output<float>(0, y_shape);
    if (rows == 0 || n_dim == 0) return;
    if (k_dim == 0) {
      std::memset(y, 0, sizeof(float) * static_cast<size_t>(rows * n_dim));
      return;
    }
    const float* x = input.data;
    const int8_t* w_q = weight_q.data;
    const float* w_scale = weight_scale.data;

    // Runtime outliers: channels (not already static) whose |x| reaches the threshold in any row.
    std::vector<int64_t> dynamic_channels;
    if (threshold_ > 0.0f) {
      std::vector<uint8_t> hit(static_cast<size_t>(k_dim), 0);
      for (int64_t r = 0; r < rows; ++r) {
        const float* row = x + r * k_dim;
        for (int64_t k = 0; k < k_dim; ++k) hit[k] |= static_cast<uint8_t>(std::fabs(row[k]) >= threshold_);
      }
      for (int64_t k = 0; k < k_dim; ++k) {
        if (hit[k] && !is_outlier[k]) {
          dynamic_channels.push_back(k);
          is_outlier[k] = 1;
        }
      }
    }
    const int64_t n_dynamic = static_cast<int64_t>(dynamic_channels.size());
    std::vector<float> dynamic_weight(static_cast<size_t>(n_dynamic * n_dim));
    for (int64_t j = 0; j < n_dynamic; ++j) {
      const int8_t* w_row = w_q + dynamic_channels[j] * n_dim;
      float* d_row = dynamic_weight.data() + j * n_dim;
      for (int64_t n = 0; n < n_dim; ++n) d_row[n] = static_cast<float>(w_row[n]) * w_scale[n];
    }
    const bool any_outlier = n_static + n_dynamic > 0;

    // Rows go through in chunks sized so that a chunk's uint8 activations and float output
    // stay in cache between quantization, the integer GEMM and the per-row rescale.
    const int64_t chunk_rows = std::max<int64_t>(
        std::min<int64_t>(rows, kChunkOutputBytes / static_cast<int64_t>(sizeof(float) * n_dim)), kMinChunkRows);

    // Scratch from the session's (arena) allocator: no page faults or zero-fill per call.
    OrtKernelContext* context = io.context();
    Ort::KernelContext kernel_context(context);
    Ort::Allocator allocator = kernel_context.GetAllocator(*memory_info_);
    const int64_t scratch_rows = std::min(rows, chunk_rows);
    Ort::MemoryAllocation a_buffer = allocator.GetAllocation(static_cast<size_t>(scratch_rows * k_dim));
    Ort::MemoryAllocation scale_buffer = allocator.GetAllocation(sizeof(float) * static_cast<size_t>(scratch_rows));
    uint8_t* a_quant = static_cast<uint8_t*>(a_buffer.get());
    float* row_scale = static_cast<float*>(scale_buffer.get());
    Ort::ConstValue w_value = kernel_context.GetInput(1);
    Ort::ConstValue w_scale_value = kernel_context.GetInput(2);
    const OrtValue* w_inner = w_value;
    Ort::Value w_unsigned_value(nullptr);
    Ort::MemoryAllocation codes_buffer(allocator, nullptr, 0);
    if (unsigned_weights_) {
      const uint8_t* codes = constant_codes_.data();
      if (static_cast<int64_t>(constant_codes_.size()) != k_dim * n_dim) {  // a weight computed at run time
        codes_buffer = allocator.GetAllocation(static_cast<size_t>(k_dim * n_dim));
        ToUnsigned(w_q, k_dim * n_dim, static_cast<uint8_t*>(codes_buffer.get()));
        codes = static_cast<const uint8_t*>(codes_buffer.get());
      }
      const int64_t w_shape_2d[] = {k_dim, n_dim};
      w_unsigned_value = Ort::Value::CreateTensor<uint8_t>(memory_info_, const_cast<uint8_t*>(codes),
                                                           static_cast<size_t>(k_dim * n_dim), w_shape_2d, 2);
      w_inner = w_unsigned_value;
    }

    for (int64_t chunk_begin = 0; chunk_begin < rows; chunk_begin += chunk_rows) {
      const int64_t chunk = std::min(chunk_rows, rows - chunk_begin);
      const float* x_chunk = x + chunk_begin * k_dim;
      float* y_chunk = y + chunk_begin * n_dim;

      ParallelRows(context, chunk, k_dim, 1 << 16, [&](int64_t begin, int64_t end) {
        std::vector<float> masked(any_outlier ? static_cast<size_t>(k_dim) : 0);
        for (int64_t r = begin; r < end; ++r) {
          const float* row = x_chunk + r * k_dim;
          if (any_outlier) {
            MaskRow(row, is_outlier.data(), masked.data(), k_dim);
            row = masked.data();
          }
          row_scale[r] = RowScale(row, k_dim);
          QuantizeRowUint8(row, k_dim, row_scale[r], a_quant + r * k_dim);
        }
      });

      const int64_t a_shape[] = {chunk, k_dim};
      const int64_t y_shape_2d[] = {chunk, n_dim};
      Ort::Value a_value = Ort::Value::CreateTensor<uint8_t>(memory_info_, a_quant, static_cast<size_t>(chunk * k_dim),
                                                             a_shape, 2);
      Ort::Value y_value = Ort::Value::CreateTensor<float>(memory_info_, y_chunk, static_cast<size_t>(chunk * n_dim),
                                                           y_shape_2d, 2);
      const OrtValue* inner_inputs[] = {a_value, w_inner, unit_scale_, w_scale_value, zero_point_, zero_point_};
      OrtValue* inner_outputs[] = {y_value};
      integer_matmul_.Invoke(context, inner_inputs, unsigned_weights_ ? 6 : 5, inner_outputs, 1);

      ParallelRows(context, chunk, n_dim * (1 + n_static + n_dynamic), 1 << 16, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          float* y_row = y_chunk + r * n_dim;
          const float* x_row = x_chunk + r * k_dim;
          ScaleInPlace(y_row, row_scale[r], n_dim);
          for (int64_t j = 0; j < n_static; ++j) {
            AddScaled(y_row, w_outlier + j * n_dim, x_row[static_channels[j]], n_dim);
          }
          for (int64_t j = 0; j < n_dynamic; ++j) {
            AddScaled(y_row, dynamic_weight.data() + j * n_dim, x_row[dynamic_channels[j]], n_dim);
          }
        }
      });
    }
  }

  static void ToUnsigned(const int8_t* w_q, int64_t count, uint8_t* out) {
    for (int64_t i = 0; i < count; ++i) out[i] = static_cast<uint8_t>(static_cast<int>(w_q[i]) + 128);
  }

  Ort::MemoryInfo memory_info_;
  Ort::Op integer_matmul_;
  bool unsigned_weights_ = false;
  // W_q + 128 (b_zero_point: zero_point_'s 128), made once when W_q is a constant initializer
  std::vector<uint8_t> constant_codes_;
  float threshold_ = 0.0f;
  float unit_scale_value_ = 1.0f;
  uint8_t zero_point_value_ = 128;
  Ort::Value unit_scale_;
  Ort::Value zero_point_;
};

}  // namespace

const OrtCustomOp* MixedInt8MatMulOp() {
  // never destroyed: sessions may outlive static teardown
  static const auto* op = new OpDef<MixedInt8MatMul>();
  return op;
}

}  // namespace outlierquant
