// Argument and attribute checks shared by every kernel (declared in common.h).
#include "common.h"

namespace outlierquant {

std::string TypeName(ONNXTensorElementDataType type) {
  switch (type) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return "uint8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: return "int8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16: return "uint16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT16: return "int16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_STRING: return "string";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL: return "bool";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "float64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return "bfloat16";
    default: return "element type " + std::to_string(static_cast<int>(type));
  }
}

std::string ShapeToString(const std::vector<int64_t>& shape) {
  std::string text = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) text += ", ";
    text += std::to_string(shape[i]);
  }
  return text + "]";
}

std::string ArgLabel(const char* kind, size_t index, const ArgSpec& arg) {
  return std::string(kind) + " " + std::to_string(index) + " (" + arg.name + ")";
}

int64_t ElementCount(const std::vector<int64_t>& shape) {
  int64_t count = 1;
  for (int64_t dim : shape) {
    if (dim < 0) throw KernelError("shape " + ShapeToString(shape) + " has a negative dimension");
    if (__builtin_mul_overflow(count, dim, &count)) {
      throw KernelError("shape " + ShapeToString(shape) + " has more elements than int64 can count");
    }
  }
  return count;
}

void CheckNodeArity(const OrtKernelInfo* info, const OpSpec& spec) {
  const Ort::ConstKernelInfo kernel_info(info);
  const size_t inputs = kernel_info.GetInputCount();
  const size_t outputs = kernel_info.GetOutputCount();
  if (inputs > spec.input_count) {
    throw KernelError("the node has " + std::to_string(inputs) + " inputs; the op takes at most " +
                      std::to_string(spec.input_count));
  }
  if (outputs > spec.output_count) {
    throw KernelError("the node has " + std::to_string(outputs) + " outputs; the op has at most " +
                      std::to_string(spec.output_count));
  }
  for (size_t i = 0; i < spec.input_count; ++i) {
    if (!spec.inputs[i].optional && (i >= inputs || kernel_info.GetInputName(i).empty())) {
      throw KernelError(ArgLabel("input", i, spec.inputs[i]) + " is required but missing");
    }
  }
  for (size_t i = 0; i < spec.output_count; ++i) {
    if (!spec.outputs[i].optional && (i >= outputs || kernel_info.GetOutputName(i).empty())) {
      throw KernelError(ArgLabel("output", i, spec.outputs[i]) + " is required but missing");
    }
  }
}

namespace {

// True when the C API call succeeded; the status of a failed call is released.
bool Succeeded(OrtStatus* status) {
  if (status == nullptr) return true;
  Ort::GetApi().ReleaseStatus(status);
  return false;
}

// The type of a node attribute that is not a float, probed through the typed getters
// (the kernel info offers no generic attribute lookup); nullptr when the node does not set
// the attribute. The list getters accept an attribute of any type (returning its list
// field, empty for a scalar), so they come last and only a non-empty list names its type.
const char* OtherAttributeType(const OrtKernelInfo* info, const char* name) {
  const OrtApi& api = Ort::GetApi();
  int64_t int_value = 0;
  size_t size = 0;
  if (Succeeded(api.KernelInfoGetAttribute_int64(info, name, &int_value))) return "an int";
  if (Succeeded(api.KernelInfoGetAttribute_string(info, name, nullptr, &size))) return "a string";
  Ort::AllocatorWithDefaultOptions allocator;
  OrtValue* tensor = nullptr;
  if (Succeeded(api.KernelInfoGetAttribute_tensor(info, name, allocator, &tensor))) {
    api.ReleaseValue(tensor);
    return "a tensor";
  }
  size_t ints = 0;
  size_t floats = 0;
  const bool ints_ok = Succeeded(api.KernelInfoGetAttributeArray_int64(info, name, nullptr, &ints));
  const bool floats_ok = Succeeded(api.KernelInfoGetAttributeArray_float(info, name, nullptr, &floats));
  if (ints_ok && ints > 0) return "a list of ints";
  if (floats_ok && floats > 0) return "a list of floats";
  if (ints_ok || floats_ok) return "an attribute of another type";
  return nullptr;
}

}  // namespace

std::optional<float> OptionalFloatAttribute(const OrtKernelInfo* info, const char* name) {
  float value = 0.0f;
  if (Succeeded(Ort::GetApi().KernelInfoGetAttribute_float(info, name, &value))) return value;
  if (const char* other = OtherAttributeType(info, name)) {
    throw KernelError(std::string("attribute '") + name + "' must be a float, got " + other);
  }
  return std::nullopt;
}

KernelIo::KernelIo(OrtKernelContext* context, const OpSpec& spec)
    : context_(context), spec_(spec), input_count_(context_.GetInputCount()),
      output_count_(context_.GetOutputCount()) {
  if (input_count_ > spec.input_count || output_count_ > spec.output_count) {
    throw KernelError("called with " + std::to_string(input_count_) + " inputs and " +
                      std::to_string(output_count_) + " outputs; the op has at most " +
                      std::to_string(spec.input_count) + " and " + std::to_string(spec.output_count));
  }
}

Ort::ConstValue KernelIo::InputValue(size_t index, ONNXTensorElementDataType type) const {
  const ArgSpec& arg = spec_.inputs[index];
  if (arg.type != type) {
    throw std::logic_error("kernel reads " + ArgLabel("input", index, arg) + " as the wrong type");
  }
  if (index >= input_count_) return Ort::ConstValue{nullptr};
  Ort::ConstValue value = context_.GetInput(index);
  if (static_cast<const OrtValue*>(value) == nullptr) return value;
  if (!value.IsTensor()) throw KernelError(ArgLabel("input", index, arg) + " must be a tensor");
  const ONNXTensorElementDataType actual = value.GetTensorTypeAndShapeInfo().GetElementType();
  if (actual != type) {
    throw KernelError(ArgLabel("input", index, arg) + " must be " + TypeName(type) + ", got " + TypeName(actual));
  }
  return value;
}

Ort::UnownedValue KernelIo::OutputValue(size_t index, const std::vector<int64_t>& shape,
                                        ONNXTensorElementDataType type) {
  const ArgSpec& arg = spec_.outputs[index];
  if (arg.type != type) {
    throw std::logic_error("kernel writes " + ArgLabel("output", index, arg) + " as the wrong type");
  }
  Ort::UnownedValue value{nullptr};
  if (index < output_count_) value = context_.GetOutput(index, shape);
  if (static_cast<OrtValue*>(value) == nullptr) {
    if (!arg.optional) throw KernelError(ArgLabel("output", index, arg) + " is required but missing");
    return value;
  }
  const ONNXTensorElementDataType actual = value.GetTensorTypeAndShapeInfo().GetElementType();
  if (actual != type) {
    throw KernelError(ArgLabel("output", index, arg) + " must be " + TypeName(type) + ", got " + TypeName(actual));
  }
  return value;
}

}  // namespace outlierquant
