// Shared helpers for the outlierquant onnxruntime kernels.
//
// The library never links libonnxruntime: ORT_API_MANUAL_INIT makes the C++ wrappers use
// the API table that RegisterCustomOps receives from the runtime that loads us.
//
// Every op is an OpDef<Kernel>: it declares its inputs and outputs (type, required or
// optional) to onnxruntime, checks a node's arity and attributes when the kernel is
// created, and runs Kernel::Compute behind a guard that turns every exception into an
// onnxruntime status. Kernels read their arguments through KernelIo, which checks
// presence and element types before any data pointer is handed out.
#pragma once

#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"

#include <cstddef>
#include <cstdint>
#include <exception>
#include <mutex>
#include <new>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

// Hot loops are compiled for AVX-512 (x86-64-v4), AVX2 and the baseline ISA, and the loader
// picks one at run time (GCC/Clang function multiversioning): wheels must not assume
// -march=native. With the AVX-512 clone the per-token quantizer takes 1.5x the time of
// onnxruntime's per-tensor DynamicQuantizeLinear on 192 x 1536 floats, one core
// (benchmarks/bench_kernels.py --threads 1). It needs GCC 11 (the x86-64-v4 level), so
// Clang and older GCC keep the AVX2 and baseline clones.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define OUTLIERQUANT_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#elif defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && (!defined(__clang__) || __clang_major__ >= 14)
#define OUTLIERQUANT_MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define OUTLIERQUANT_MULTIVERSION
#endif

namespace outlierquant {

inline constexpr const char* kDomain = "ai.outlierquant";
inline constexpr const char* kCpuProvider = "CPUExecutionProvider";

// A malformed node or malformed input values; reported as ORT_INVALID_ARGUMENT.
class KernelError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct ArgSpec {
  const char* name;
  ONNXTensorElementDataType type;
  bool optional;
};

struct OpSpec {
  const char* name;
  const ArgSpec* inputs;
  size_t input_count;
  const ArgSpec* outputs;
  size_t output_count;
};

template <typename T>
struct TensorType;
template <>
struct TensorType<float> {
  static constexpr ONNXTensorElementDataType value = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
};
template <>
struct TensorType<int8_t> {
  static constexpr ONNXTensorElementDataType value = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
};
template <>
struct TensorType<uint8_t> {
  static constexpr ONNXTensorElementDataType value = ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
};
template <>
struct TensorType<int64_t> {
  static constexpr ONNXTensorElementDataType value = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
};

std::string TypeName(ONNXTensorElementDataType type);
std::string ShapeToString(const std::vector<int64_t>& shape);
// "input 3 (outlier_channels)"
std::string ArgLabel(const char* kind, size_t index, const ArgSpec& arg);

// Product of the dimensions; throws KernelError when a dimension is negative or the
// product overflows int64.
int64_t ElementCount(const std::vector<int64_t>& shape);

// Checks a node against its op's declared arguments when the kernel is created: no more
// inputs/outputs than declared, every required one present (a non-empty name).
void CheckNodeArity(const OrtKernelInfo* info, const OpSpec& spec);

// Reads a float attribute: nullopt when the node does not set it, KernelError when it is
// set with another attribute type.
std::optional<float> OptionalFloatAttribute(const OrtKernelInfo* info, const char* name);

template <typename T>
struct TensorView {
  const T* data = nullptr;
  std::vector<int64_t> shape;
};

// The arguments of one Compute call, checked against the op's spec.
class KernelIo {
 public:
  KernelIo(OrtKernelContext* context, const OpSpec& spec);

  // nullopt when an optional input is left out (not passed, or passed as an empty name).
  template <typename T>
  std::optional<TensorView<T>> Input(size_t index) const {
    const Ort::ConstValue value = InputValue(index, TensorType<T>::value);
    if (static_cast<const OrtValue*>(value) == nullptr) return std::nullopt;
    TensorView<T> view;
    view.shape = value.GetTensorTypeAndShapeInfo().GetShape();
    view.data = value.GetTensorData<T>();
    return view;
  }

  template <typename T>
  TensorView<T> RequiredInput(size_t index) const {
    std::optional<TensorView<T>> view = Input<T>(index);
    if (!view) throw KernelError(ArgLabel("input", index, spec_.inputs[index]) + " is required but missing");
    return *view;
  }

  // Allocates output `index` with `shape`. Returns nullptr when an optional output is left
  // out, and also when the shape has no elements: either way there is nothing to write.
  template <typename T>
  T* Output(size_t index, const std::vector<int64_t>& shape) {
    const int64_t count = ElementCount(shape);
    Ort::UnownedValue value = OutputValue(index, shape, TensorType<T>::value);
    if (static_cast<OrtValue*>(value) == nullptr || count == 0) return nullptr;
    T* data = value.GetTensorMutableData<T>();
    if (data == nullptr) throw KernelError(ArgLabel("output", index, spec_.outputs[index]) + " has no buffer");
    return data;
  }

  OrtKernelContext* context() const { return context_.GetOrtKernelContext(); }

 private:
  Ort::ConstValue InputValue(size_t index, ONNXTensorElementDataType type) const;
  Ort::UnownedValue OutputValue(size_t index, const std::vector<int64_t>& shape, ONNXTensorElementDataType type);

  Ort::KernelContext context_;
  const OpSpec& spec_;
  size_t input_count_;
  size_t output_count_;
};

// Runs fn and returns nullptr, or the status that describes what it threw, prefixed with
// the op name. Nothing may cross the C boundary into onnxruntime as an exception.
template <typename Fn>
OrtStatus* Guarded(const char* op, Fn&& fn) noexcept {
  OrtErrorCode code = ORT_FAIL;
  const char* detail = "unknown error";
  std::string message;
  try {
    fn();
    return nullptr;
  } catch (const KernelError& error) {
    code = ORT_INVALID_ARGUMENT;
    message = error.what();
  } catch (const Ort::Exception& error) {
    code = error.GetOrtErrorCode();
    message = error.what();
  } catch (const std::bad_alloc&) {
    detail = "out of memory";
  } catch (const std::exception& error) {
    message = error.what();
  } catch (...) {
  }
  try {
    message = std::string(op) + ": " + (message.empty() ? detail : message);
    return Ort::GetApi().CreateStatus(code, message.c_str());
  } catch (...) {
    return Ort::GetApi().CreateStatus(code, op);
  }
}

// Base of every kernel: Compute(KernelIo&) runs behind Guarded.
template <typename Derived>
struct GuardedKernel {
  OrtStatus* ComputeV2(OrtKernelContext* context) noexcept {
    return Guarded(Derived::kSpec.name, [&] {
      KernelIo io(context, Derived::kSpec);
      static_cast<Derived*>(this)->Compute(io);
    });
  }
};

template <typename Kernel>
struct OpDef : Ort::CustomOpBase<OpDef<Kernel>, Kernel, /*WithStatus=*/true> {
  OpDef() {
    // The V2 entry points are the ones onnxruntime calls; clear the V1 ones explicitly.
    this->CreateKernel = nullptr;
    this->KernelCompute = nullptr;
  }

  const char* GetName() const { return Kernel::kSpec.name; }
  const char* GetExecutionProviderType() const { return kCpuProvider; }

  size_t GetInputTypeCount() const { return Kernel::kSpec.input_count; }
  ONNXTensorElementDataType GetInputType(size_t index) const { return Kernel::kSpec.inputs[index].type; }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return Kernel::kSpec.inputs[index].optional ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }

  size_t GetOutputTypeCount() const { return Kernel::kSpec.output_count; }
  ONNXTensorElementDataType GetOutputType(size_t index) const { return Kernel::kSpec.outputs[index].type; }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t index) const {
    return Kernel::kSpec.outputs[index].optional ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }

  OrtStatus* CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    *kernel = nullptr;
    return Guarded(Kernel::kSpec.name, [&] {
      CheckNodeArity(info, Kernel::kSpec);
      *kernel = new Kernel(info);
    });
  }
};

// Runs body(begin_row, end_row) over [0, rows) on the session's intra-op thread pool.
// Rows are grouped so that each task carries at least `min_work_per_task` units of work;
// small problems run inline on the calling thread. An exception thrown by body on a pool
// thread is rethrown here, on the calling thread, once every task has finished.
template <typename Body>
void ParallelRows(OrtKernelContext* context, int64_t rows, int64_t work_per_row,
                  int64_t min_work_per_task, const Body& body) {
  if (rows <= 0) return;
  int64_t rows_per_task = min_work_per_task / (work_per_row > 0 ? work_per_row : 1);
  if (rows_per_task < 1) rows_per_task = 1;
  const int64_t tasks = (rows + rows_per_task - 1) / rows_per_task;
  if (tasks <= 1 || context == nullptr) {
    body(int64_t{0}, rows);
    return;
  }
  struct Payload {
    const Body* body;
    int64_t rows;
    int64_t rows_per_task;
    std::mutex mutex;
    std::exception_ptr error;
  } payload{&body, rows, rows_per_task, {}, nullptr};
  auto trampoline = [](void* data, size_t task) {
    auto* p = static_cast<Payload*>(data);
    const int64_t begin = static_cast<int64_t>(task) * p->rows_per_task;
    const int64_t end = begin + p->rows_per_task < p->rows ? begin + p->rows_per_task : p->rows;
    try {
      (*p->body)(begin, end);
    } catch (...) {
      std::lock_guard<std::mutex> lock(p->mutex);
      if (!p->error) p->error = std::current_exception();
    }
  };
  Ort::KernelContext(context).ParallelFor(trampoline, static_cast<size_t>(tasks), 0, &payload);
  if (payload.error) std::rethrow_exception(payload.error);
}

// Symmetric per-row int8 quantization shared by DynamicQuantizePerToken and MixedInt8MatMul.
// scale = max|x| / 127 (1 for an all-zero row); q = clip(round_half_even(x / scale), -127, 127).
// A NaN quotient (NaN input) saturates to +127 instead of reaching an undefined float-to-int
// conversion; inputs are specified to be finite.
float RowScale(const float* row, int64_t count);
void QuantizeRowInt8(const float* row, int64_t count, float scale, int8_t* out);
// Same values shifted by +128 into uint8 (zero point 128), the operand layout MLAS's fast
// u8 x s8 GEMM expects.
void QuantizeRowUint8(const float* row, int64_t count, float scale, uint8_t* out);

const OrtCustomOp* HadamardTransformOp();
const OrtCustomOp* DynamicQuantizePerTokenOp();
const OrtCustomOp* MixedInt8MatMulOp();

}  // namespace outlierquant
