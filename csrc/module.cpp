// Python module of the kdfast._C extension. The operators themselves are registered
// with the PyTorch dispatcher by TORCH_LIBRARY_FRAGMENT blocks in the other sources
// (one file per op family), so they are reached as torch.ops.kdfast.<name> once this
// module is imported; nothing is bound through pybind11 directly.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kdfast compiled operators (registered under torch.ops.kdfast)";
}
