// Torch glue for the fastssl CUDA kernels: the extension module `fastssl._C` (pybind11).
//
// Each binding checks its arguments (CHECK_* macros: a ValueError/TypeError that names the argument
// and the shapes, never a CUDA crash), allocates the outputs, selects the tensors' device and the
// current CUDA stream, and calls a launcher of csrc/fastssl_kernels.h (raw pointers only). The Python
// adapters in fastssl/kernels/cuda/ call these from the `fastssl::` custom ops of fastssl/ops, which
// own autograd, fake tensors and torch.compile; nothing here is called by users directly.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <optional>
#include <sstream>
#include <string>
#include <tuple>

#include "fastssl_kernels.h"

namespace {

std::string shape_of(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

#define CHECK_CUDA(t, name) \
  TORCH_CHECK_VALUE((t).is_cuda(), "fastssl._C: ", name, " must be a CUDA tensor, got one on ", (t).device())
#define CHECK_2D(t, name) \
  TORCH_CHECK_VALUE((t).dim() == 2, "fastssl._C: ", name, " must be 2-D, got shape ", shape_of(t))
#define CHECK_SAME_DEVICE(a, b, na, nb)                                                                        \
  TORCH_CHECK_VALUE((a).device() == (b).device(), "fastssl._C: ", na, " is on ", (a).device(), " but ", nb, \
                    " is on ", (b).device())
#define CHECK_DTYPE(t, dt, name)                                                                           \
  TORCH_CHECK_TYPE((t).scalar_type() == (dt), "fastssl._C: ", name, " must be ", c10::toString(dt), ", got ", \
                   c10::toString((t).scalar_type()))
#define CHECK_VECTOR(t, n, name)                                                                            \
  TORCH_CHECK_VALUE((t).dim() == 1 && (t).size(0) == (n) && (t).is_contiguous(), "fastssl._C: ", name,      \
                    " must be a contiguous vector of ", (n), " entries, got shape ", shape_of(t))
#define CHECK_CUDA_OK(expr)                                                                              \
  do {                                                                                                   \
    const cudaError_t err_ = (expr);                                                                     \
    TORCH_CHECK(err_ == cudaSuccess, "fastssl._C: CUDA launch failed: ", cudaGetErrorString(err_));       \
  } while (0)

fastssl::DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return fastssl::DType::kFloat32;
    case at::kHalf: return fastssl::DType::kFloat16;
    case at::kBFloat16: return fastssl::DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, "fastssl._C: ", name, " must be float32, float16 or bfloat16, got ",
                       c10::toString(t.scalar_type()));
  }
  return fastssl::DType::kFloat32;
}

fastssl::Matrix as_matrix(const at::Tensor& t) {
  fastssl::Matrix m;
  m.ptr = t.data_ptr();
  m.rows = t.size(0);
  m.cols = t.size(1);
  m.stride_r = t.stride(0);
  m.stride_c = t.stride(1);
  return m;
}

struct Problem {
  fastssl::PairwiseLseProblem p;
  fastssl::DType dtype;
};

Problem make_problem(const at::Tensor& x, const at::Tensor& y, const std::optional<at::Tensor>& bank,
                     const at::Tensor& scale, int64_t pos_offset, bool exclude_self, bool include_pos,
                     bool y_negatives) {
  CHECK_CUDA(x, "x");
  CHECK_2D(x, "x");
  CHECK_2D(y, "y");
  CHECK_SAME_DEVICE(x, y, "x", "y");
  CHECK_SAME_DEVICE(x, scale, "x", "scale");
  TORCH_CHECK_VALUE(x.size(1) == y.size(1), "fastssl._C: x ", shape_of(x), " and y ", shape_of(y),
                    " must have the same number of columns D");
  TORCH_CHECK_VALUE(x.size(1) > 0, "fastssl._C: D must be positive, got x ", shape_of(x));
  TORCH_CHECK_VALUE(y.size(0) > 0, "fastssl._C: y needs at least one row, got ", shape_of(y));
  TORCH_CHECK_TYPE(x.scalar_type() == y.scalar_type(), "fastssl._C: x (", c10::toString(x.scalar_type()),
                   ") and y (", c10::toString(y.scalar_type()), ") must have the same dtype");
  CHECK_DTYPE(scale, at::kFloat, "scale");
  TORCH_CHECK_VALUE(scale.numel() == 1, "fastssl._C: scale must be a 0-dim tensor, got shape ", shape_of(scale));
  TORCH_CHECK_VALUE(pos_offset >= 0 && pos_offset < y.size(0), "fastssl._C: pos_offset must be in [0, Ny = ",
                    y.size(0), "), got ", pos_offset);
  Problem out;
  out.dtype = dtype_of(x, "x");
  out.p.x = as_matrix(x);
  out.p.y = as_matrix(y);
  if (bank.has_value() && bank->numel() > 0) {
    CHECK_2D(*bank, "bank");
    CHECK_SAME_DEVICE(x, *bank, "x", "bank");
    TORCH_CHECK_VALUE(bank->size(1) == x.size(1), "fastssl._C: bank ", shape_of(*bank), " and x ", shape_of(x),
                      " must have the same number of columns D");
    TORCH_CHECK_TYPE(bank->scalar_type() == x.scalar_type(), "fastssl._C: bank and x must have the same dtype");
    out.p.bank = as_matrix(*bank);
  }
  out.p.scale = scale.data_ptr<float>();
  out.p.pos_offset = pos_offset;
  out.p.exclude_self = exclude_self;
  out.p.include_pos = include_pos;
  out.p.y_negatives = y_negatives;
  return out;
}

std::tuple<at::Tensor, at::Tensor> pairwise_lse_forward(const at::Tensor& x, const at::Tensor& y,
                                                        const std::optional<at::Tensor>& bank,
                                                        const at::Tensor& scale, int64_t pos_offset,
                                                        bool exclude_self, bool include_pos, bool y_negatives) {
  const Problem pr = make_problem(x, y, bank, scale, pos_offset, exclude_self, include_pos, y_negatives);
  const c10::cuda::CUDAGuard guard(x.device());
  auto opts = x.options().dtype(at::kFloat);
  at::Tensor lse = at::empty({x.size(0)}, opts);
  at::Tensor pos = at::empty({x.size(0)}, opts);
  if (x.size(0) == 0) return {lse, pos};
  CHECK_CUDA_OK(fastssl::pairwise_lse_forward(pr.p, pr.dtype, lse.data_ptr<float>(), pos.data_ptr<float>(),
                                              c10::cuda::getCurrentCUDAStream().stream()));
  return {lse, pos};
}

#ifdef FASTSSL_WITH_SM90
// The sm_90a code runs on sm_90 devices only.
void check_sm90_device(const at::Tensor& x) {
  int major = 0, minor = 0;
  CHECK_CUDA_OK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, x.get_device()));
  CHECK_CUDA_OK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, x.get_device()));
  TORCH_CHECK_VALUE(major == 9 && minor == 0, "fastssl._C: the sm_90a kernels need an sm_90 GPU, x is on sm_", major,
                    minor);
}

// The Hopper forward (pairwise_lse_sm90.cu, linked only into builds for sm_90): the same (lse, pos) as
// pairwise_lse_forward. Inputs it cannot take (fp32, rows TMA cannot read, D > 512) run the sm_80
// kernel; a device other than sm_90 is an error (its sm_90a code runs nowhere else).
std::tuple<at::Tensor, at::Tensor> pairwise_lse_forward_sm90(const at::Tensor& x, const at::Tensor& y,
                                                             const std::optional<at::Tensor>& bank,
                                                             const at::Tensor& scale, int64_t pos_offset,
                                                             bool exclude_self, bool include_pos, bool y_negatives) {
  const Problem pr = make_problem(x, y, bank, scale, pos_offset, exclude_self, include_pos, y_negatives);
  if (!fastssl::pairwise_lse_sm90_supported(pr.p, pr.dtype)) {
    return pairwise_lse_forward(x, y, bank, scale, pos_offset, exclude_self, include_pos, y_negatives);
  }
  const c10::cuda::CUDAGuard guard(x.device());
  check_sm90_device(x);
  auto opts = x.options().dtype(at::kFloat);
  at::Tensor lse = at::empty({x.size(0)}, opts);
  at::Tensor pos = at::empty({x.size(0)}, opts);
  if (x.size(0) == 0) return {lse, pos};
  CHECK_CUDA_OK(fastssl::pairwise_lse_forward_sm90(pr.p, pr.dtype, lse.data_ptr<float>(), pos.data_ptr<float>(),
                                                   c10::cuda::getCurrentCUDAStream().stream()));
  return {lse, pos};
}

// Whether the Hopper kernel of `role` runs on these inputs (else the sm_80 one): "forward"
// (pairwise_lse_forward_sm90), "rows" / "cols" (pairwise_lse_backward_sm90's dx / dy), "sym" (its
// symmetric x = y launch, with all columns in the LSE).
bool pairwise_lse_sm90_supported(const at::Tensor& x, const at::Tensor& y, const std::optional<at::Tensor>& bank,
                                 const std::string& role) {
  TORCH_CHECK_VALUE(role == "forward" || role == "rows" || role == "cols" || role == "sym",
                    "fastssl._C: role must be 'forward', 'rows', 'cols' or 'sym', got '", role, "'");
  CHECK_2D(x, "x");
  CHECK_2D(y, "y");
  fastssl::PairwiseLseProblem p;
  p.x = as_matrix(x);
  p.y = as_matrix(y);
  if (bank.has_value() && bank->numel() > 0) {
    CHECK_2D(*bank, "bank");
    p.bank = as_matrix(*bank);
  }
  const fastssl::DType dtype = dtype_of(x, "x");
  if (role == "rows") return fastssl::pairwise_lse_rows_sm90_supported(p, dtype);
  if (role == "cols") return fastssl::pairwise_lse_cols_sm90_supported(p, dtype);
  if (role == "sym") return fastssl::pairwise_lse_sym_sm90_supported(p, dtype);
  return fastssl::pairwise_lse_sm90_supported(p, dtype);
}
#endif  // FASTSSL_WITH_SM90

// The pipelined sm_80+ forward (pairwise_lse_pipelined.cu): the same (lse, pos) as pairwise_lse_forward;
// inputs it cannot take (fp32, rows that are not contiguous and 16-byte aligned, D > 256) run that one.
std::tuple<at::Tensor, at::Tensor> pairwise_lse_forward_pipelined(const at::Tensor& x, const at::Tensor& y,
                                                                  const std::optional<at::Tensor>& bank,
                                                                  const at::Tensor& scale, int64_t pos_offset,
                                                                  bool exclude_self, bool include_pos,
                                                                  bool y_negatives) {
  const Problem pr = make_problem(x, y, bank, scale, pos_offset, exclude_self, include_pos, y_negatives);
  if (!fastssl::pairwise_lse_pipelined_supported(pr.p, pr.dtype) || x.size(0) == 0) {
    return pairwise_lse_forward(x, y, bank, scale, pos_offset, exclude_self, include_pos, y_negatives);
  }
  const c10::cuda::CUDAGuard guard(x.device());
  auto opts = x.options().dtype(at::kFloat);
  at::Tensor lse = at::empty({x.size(0)}, opts);
  at::Tensor pos = at::empty({x.size(0)}, opts);
  CHECK_CUDA_OK(fastssl::pairwise_lse_forward_pipelined(pr.p, pr.dtype, lse.data_ptr<float>(), pos.data_ptr<float>(),
                                                        c10::cuda::getCurrentCUDAStream().stream()));
  return {lse, pos};
}

// Whether the pipelined kernels (forward, dx and dy) take these inputs.
bool pairwise_lse_pipelined_supported(const at::Tensor& x, const at::Tensor& y,
                                      const std::optional<at::Tensor>& bank) {
  CHECK_2D(x, "x");
  CHECK_2D(y, "y");
  fastssl::PairwiseLseProblem p;
  p.x = as_matrix(x);
  p.y = as_matrix(y);
  if (bank.has_value() && bank->numel() > 0) {
    CHECK_2D(*bank, "bank");
    p.bank = as_matrix(*bank);
  }
  return fastssl::pairwise_lse_pipelined_supported(p, dtype_of(x, "x"));
}

// (dx, dy) in the input dtype. `same`: y is x, and the caller adds dx + dy. `hopper`: dx and dy by the
// sm_90a kernels where they apply (pairwise_lse_backward_sm90 below); `pipelined`: by the pipelined
// sm_80+ kernels (pairwise_lse_backward_pipelined).
std::tuple<at::Tensor, at::Tensor> backward(
    const at::Tensor& x, const at::Tensor& y, const std::optional<at::Tensor>& bank, const at::Tensor& scale,
    const at::Tensor& lse, const at::Tensor& grad_lse, const at::Tensor& grad_pos, const at::Tensor& grad_lse_absmax,
    int64_t pos_offset, bool exclude_self, bool include_pos, bool y_negatives, bool same, bool hopper,
    bool pipelined = false) {
  const Problem pr = make_problem(x, y, bank, scale, pos_offset, exclude_self, include_pos, y_negatives);
  const int64_t m = x.size(0);
  auto check_stat = [&](const at::Tensor& t, const char* name) {
    CHECK_SAME_DEVICE(x, t, "x", name);
    CHECK_DTYPE(t, at::kFloat, name);
    CHECK_VECTOR(t, m, name);
  };
  check_stat(lse, "lse");
  check_stat(grad_lse, "grad_lse");
  check_stat(grad_pos, "grad_pos");
  CHECK_SAME_DEVICE(x, grad_lse_absmax, "x", "grad_lse_absmax");  // the kernels dereference it
  CHECK_DTYPE(grad_lse_absmax, at::kFloat, "grad_lse_absmax");
  TORCH_CHECK_VALUE(grad_lse_absmax.numel() == 1, "fastssl._C: grad_lse_absmax must hold one value");
  TORCH_CHECK_VALUE(!same || (x.data_ptr() == y.data_ptr() && x.sizes() == y.sizes() && x.strides() == y.strides()),
                    "fastssl._C: same=True needs y to be x");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty({m, x.size(1)}, x.options());
  at::Tensor dy = at::empty({y.size(0), y.size(1)}, y.options());
  if (m == 0) {
    dy.zero_();
    return {dx, dy};
  }
  fastssl::PairwiseLseGrads g;
  g.lse = lse.data_ptr<float>();
  g.grad_lse = grad_lse.data_ptr<float>();
  g.grad_pos = grad_pos.data_ptr<float>();
  g.grad_lse_absmax = grad_lse_absmax.data_ptr<float>();
  g.dx = dx.data_ptr();
  g.dy = dy.data_ptr();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const bool symmetric = same && y_negatives && pr.p.bank.rows == 0 && pr.dtype != fastssl::DType::kFloat32;
#ifdef FASTSSL_WITH_SM90
  if (hopper && symmetric && fastssl::pairwise_lse_sym_sm90_supported(pr.p, pr.dtype)) {
    check_sm90_device(x);
    CHECK_CUDA_OK(fastssl::pairwise_lse_backward_sym_sm90(pr.p, g, pr.dtype, stream));
    return {dx, dy};
  }
  // Otherwise each gradient on its sm_90a kernel where that applies, else on the sm_80 one.
  const bool rows90 = hopper && fastssl::pairwise_lse_rows_sm90_supported(pr.p, pr.dtype);
  const bool cols90 = hopper && fastssl::pairwise_lse_cols_sm90_supported(pr.p, pr.dtype);
  if (rows90 || cols90) {
    check_sm90_device(x);
    CHECK_CUDA_OK(rows90 ? fastssl::pairwise_lse_backward_rows_sm90(pr.p, g, pr.dtype, stream)
                         : fastssl::pairwise_lse_backward(pr.p, g, fastssl::BackwardKind::kRows, pr.dtype, stream));
    CHECK_CUDA_OK(cols90 ? fastssl::pairwise_lse_backward_cols_sm90(pr.p, g, pr.dtype, stream)
                         : fastssl::pairwise_lse_backward(pr.p, g, fastssl::BackwardKind::kCols, pr.dtype, stream));
    return {dx, dy};
  }
#else
  TORCH_CHECK(!hopper, "fastssl._C: built without the sm_90a kernels");
#endif
  if (pipelined && fastssl::pairwise_lse_pipelined_supported(pr.p, pr.dtype)) {
    if (same && y_negatives && pr.p.bank.rows == 0) {
      CHECK_CUDA_OK(fastssl::pairwise_lse_backward_sym_pipelined(pr.p, g, pr.dtype, stream));
    } else {
      CHECK_CUDA_OK(fastssl::pairwise_lse_backward_rows_pipelined(pr.p, g, pr.dtype, stream));
      CHECK_CUDA_OK(fastssl::pairwise_lse_backward_cols_pipelined(pr.p, g, pr.dtype, stream));
    }
    return {dx, dy};
  }
  if (symmetric) {
    CHECK_CUDA_OK(fastssl::pairwise_lse_backward(pr.p, g, fastssl::BackwardKind::kSymmetric, pr.dtype, stream));
  } else {
    CHECK_CUDA_OK(fastssl::pairwise_lse_backward(pr.p, g, fastssl::BackwardKind::kRows, pr.dtype, stream));
    CHECK_CUDA_OK(fastssl::pairwise_lse_backward(pr.p, g, fastssl::BackwardKind::kCols, pr.dtype, stream));
  }
  return {dx, dy};
}

std::tuple<at::Tensor, at::Tensor> pairwise_lse_backward(
    const at::Tensor& x, const at::Tensor& y, const std::optional<at::Tensor>& bank, const at::Tensor& scale,
    const at::Tensor& lse, const at::Tensor& grad_lse, const at::Tensor& grad_pos, const at::Tensor& grad_lse_absmax,
    int64_t pos_offset, bool exclude_self, bool include_pos, bool y_negatives, bool same) {
  return backward(x, y, bank, scale, lse, grad_lse, grad_pos, grad_lse_absmax, pos_offset, exclude_self, include_pos,
                  y_negatives, same, false);
}

// The backward with dx and dy by the pipelined sm_80+ kernels (what they take; else as
// pairwise_lse_backward): the symmetric one when y is x, else the row and the column one.
std::tuple<at::Tensor, at::Tensor> pairwise_lse_backward_pipelined(
    const at::Tensor& x, const at::Tensor& y, const std::optional<at::Tensor>& bank, const at::Tensor& scale,
    const at::Tensor& lse, const at::Tensor& grad_lse, const at::Tensor& grad_pos, const at::Tensor& grad_lse_absmax,
    int64_t pos_offset, bool exclude_self, bool include_pos, bool y_negatives, bool same) {
  return backward(x, y, bank, scale, lse, grad_lse, grad_pos, grad_lse_absmax, pos_offset, exclude_self, include_pos,
                  y_negatives, same, false, true);
}

#ifdef FASTSSL_WITH_SM90
// The backward on the sm_90a kernels (D <= 256 and what TMA can read; else as pairwise_lse_backward):
// x = y in bf16/fp16 with all columns and no bank is one symmetric launch, else dx and dy each on its
// own kernel.
std::tuple<at::Tensor, at::Tensor> pairwise_lse_backward_sm90(
    const at::Tensor& x, const at::Tensor& y, const std::optional<at::Tensor>& bank, const at::Tensor& scale,
    const at::Tensor& lse, const at::Tensor& grad_lse, const at::Tensor& grad_pos, const at::Tensor& grad_lse_absmax,
    int64_t pos_offset, bool exclude_self, bool include_pos, bool y_negatives, bool same) {
  return backward(x, y, bank, scale, lse, grad_lse, grad_pos, grad_lse_absmax, pos_offset, exclude_self, include_pos,
                  y_negatives, same, true);
}
#endif

std::optional<const float*> vec_ptr(const std::optional<at::Tensor>& t, const at::Tensor& a, int64_t k,
                                    const char* name) {
  if (!t.has_value()) return std::nullopt;
  CHECK_SAME_DEVICE(a, *t, "a", name);
  CHECK_DTYPE(*t, at::kFloat, name);
  CHECK_VECTOR(*t, k, name);
  return t->data_ptr<float>();
}

// â = round_to_dtype((a − shift)·scale) per column, contiguous (R, K), in a's dtype or fp32.
at::Tensor affine_columns(const at::Tensor& a, const std::optional<at::Tensor>& shift,
                          const std::optional<at::Tensor>& scale, bool out_fp32) {
  CHECK_CUDA(a, "a");
  CHECK_2D(a, "a");
  const fastssl::DType dt = dtype_of(a, "a");
  const int64_t k = a.size(1);
  const float* sh = vec_ptr(shift, a, k, "shift").value_or(nullptr);
  const float* sc = vec_ptr(scale, a, k, "scale").value_or(nullptr);
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor out = at::empty({a.size(0), k}, a.options().dtype(out_fp32 ? at::kFloat : a.scalar_type()));
  CHECK_CUDA_OK(fastssl::affine_columns(as_matrix(a), dt, sh, sc, out.data_ptr(),
                                        out_fp32 ? fastssl::DType::kFloat32 : dt, c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

// Σ u·v over two contiguous fp32 tensors of equal size (u may be v), as a 0-dim fp32 tensor.
at::Tensor sum_product(const at::Tensor& u, const at::Tensor& v) {
  CHECK_CUDA(u, "u");
  CHECK_SAME_DEVICE(u, v, "u", "v");
  CHECK_DTYPE(u, at::kFloat, "u");
  CHECK_DTYPE(v, at::kFloat, "v");
  TORCH_CHECK_VALUE(u.is_contiguous() && v.is_contiguous() && u.numel() == v.numel(),
                    "fastssl._C: u ", shape_of(u), " and v ", shape_of(v), " must be contiguous and of equal size");
  const c10::cuda::CUDAGuard guard(u.device());
  at::Tensor out = at::empty({}, u.options());
  at::Tensor partials = at::empty({fastssl::sum_product_partials(u.numel())}, u.options());
  CHECK_CUDA_OK(fastssl::sum_product(u.data_ptr<float>(), v.data_ptr<float>(), u.numel(), partials.data_ptr<float>(),
                                     out.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

#ifdef FASTSSL_WITH_SM90
// The operands of the sm_90a ‖âᵀb̂‖²_F: a (N, Da) and b (N, Db) (None: b is a), one device and dtype.
std::tuple<fastssl::Matrix, fastssl::Matrix, fastssl::DType> frobenius_operands(const at::Tensor& a,
                                                                             const std::optional<at::Tensor>& b) {
  CHECK_CUDA(a, "a");
  CHECK_2D(a, "a");
  const fastssl::DType dt = dtype_of(a, "a");
  if (!b.has_value()) return {as_matrix(a), as_matrix(a), dt};
  CHECK_2D(*b, "b");
  CHECK_SAME_DEVICE(a, *b, "a", "b");
  CHECK_DTYPE(*b, a.scalar_type(), "b");
  TORCH_CHECK_VALUE(b->size(0) == a.size(0), "fastssl._C: a ", shape_of(a), " and b ", shape_of(*b),
                    " must have the same number of rows");
  return {as_matrix(a), as_matrix(*b), dt};
}

// Whether sq_frobenius_forward_sm90 takes these operands on this route (bf16/fp16, rows TMA can read).
bool sq_frobenius_sm90_supported(const at::Tensor& a, const std::optional<at::Tensor>& b, bool outer) {
  const auto [ma, mb, dt] = frobenius_operands(a, b);
  return fastssl::sq_frobenius_sm90_supported(ma, mb, dt, outer);
}

// ‖aᵀb‖²_F (b None: ‖aᵀa‖²_F) as a 0-dim fp32 tensor, by frobenius_sm90.cu on the inner route (tiles of
// aᵀb) or the outer one (tiles of aaᵀ and bbᵀ): the route's matrix is never stored.
at::Tensor sq_frobenius_forward_sm90(const at::Tensor& a, const std::optional<at::Tensor>& b, bool outer) {
  const auto [ma, mb, dt] = frobenius_operands(a, b);
  TORCH_CHECK_VALUE(fastssl::sq_frobenius_sm90_supported(ma, mb, dt, outer), "fastssl._C: the sm_90a Frobenius ",
                    "kernel takes bfloat16/float16 operands whose rows TMA can read (contiguous rows, 16-byte aligned ",
                    "base and row stride; outer: equal widths), got a ", shape_of(a), " with strides ", a.strides(),
                    " in ", c10::toString(a.scalar_type()));
  const c10::cuda::CUDAGuard guard(a.device());
  check_sm90_device(a);
  const bool same = !b.has_value();
  at::Tensor out = at::empty({}, a.options().dtype(at::kFloat));
  at::Tensor partials =
      at::empty({fastssl::sq_frobenius_sm90_partials(ma.rows, ma.cols, mb.cols, same, outer)}, out.options());
  CHECK_CUDA_OK(fastssl::sq_frobenius_sm90(ma, mb, same, outer, dt, partials.data_ptr<float>(), out.data_ptr<float>(),
                                           c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}
#endif  // FASTSSL_WITH_SM90

// Per-column (mean, var) of a (R, K), fp32, var with `correction` (0 biased, 1 unbiased).
std::tuple<at::Tensor, at::Tensor> column_mean_var(const at::Tensor& a, int64_t correction) {
  CHECK_CUDA(a, "a");
  CHECK_2D(a, "a");
  TORCH_CHECK_VALUE(correction == 0 || correction == 1, "fastssl._C: correction must be 0 or 1, got ", correction);
  const fastssl::DType dt = dtype_of(a, "a");
  const c10::cuda::CUDAGuard guard(a.device());
  auto opts = a.options().dtype(at::kFloat);
  at::Tensor mean = at::empty({a.size(1)}, opts);
  at::Tensor var = at::empty({a.size(1)}, opts);
  at::Tensor partials = at::empty({fastssl::column_stats_partials(a.size(0), a.size(1))}, opts);
  CHECK_CUDA_OK(fastssl::column_stats(as_matrix(a), dt, static_cast<int>(correction), partials.data_ptr<float>(),
                                      mean.data_ptr<float>(), var.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream()));
  return {mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> worst_pair_forward(const at::Tensor& v) {
  CHECK_CUDA(v, "views");
  TORCH_CHECK_VALUE(v.dim() == 3, "fastssl._C: views must be (N, m, D), got shape ", shape_of(v));
  TORCH_CHECK_VALUE(v.size(1) >= 2 && v.size(1) <= fastssl::kWorstPairMaxViews, "fastssl._C: views must have 2 to ",
                    fastssl::kWorstPairMaxViews, " views per sample, got shape ", shape_of(v));
  const fastssl::DType dt = dtype_of(v, "views");
  const c10::cuda::CUDAGuard guard(v.device());
  at::Tensor sims = at::empty({v.size(0)}, v.options().dtype(at::kFloat));
  at::Tensor first = at::empty({v.size(0)}, v.options().dtype(at::kLong));
  at::Tensor second = at::empty({v.size(0)}, v.options().dtype(at::kLong));
  fastssl::Views views;
  views.ptr = v.data_ptr();
  views.samples = v.size(0);
  views.views = v.size(1);
  views.dim = v.size(2);
  views.stride_n = v.stride(0);
  views.stride_m = v.stride(1);
  views.stride_d = v.stride(2);
  CHECK_CUDA_OK(fastssl::worst_pair_forward(views, dt, sims.data_ptr<float>(), first.data_ptr<int64_t>(),
                                            second.data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream().stream()));
  return {sims, first, second};
}

// ---- pairwise sigmoid (SigLIP) and pairwise max (KoLeo's nearest neighbour) ----

// x (M, D) and y (Ny, D): CUDA, one device, one dtype, equal D > 0, Ny > 0.
void check_rows_and_columns(const at::Tensor& x, const at::Tensor& y) {
  CHECK_CUDA(x, "x");
  CHECK_2D(x, "x");
  CHECK_2D(y, "y");
  CHECK_SAME_DEVICE(x, y, "x", "y");
  TORCH_CHECK_VALUE(x.size(1) == y.size(1), "fastssl._C: x ", shape_of(x), " and y ", shape_of(y),
                    " must have the same number of columns D");
  TORCH_CHECK_VALUE(x.size(1) > 0, "fastssl._C: D must be positive, got x ", shape_of(x));
  TORCH_CHECK_VALUE(y.size(0) > 0, "fastssl._C: y needs at least one row, got ", shape_of(y));
  TORCH_CHECK_TYPE(x.scalar_type() == y.scalar_type(), "fastssl._C: x (", c10::toString(x.scalar_type()),
                   ") and y (", c10::toString(y.scalar_type()), ") must have the same dtype");
}

// A one-value fp32 tensor on x's device (the kernels read it there: no host sync).
const float* device_scalar(const at::Tensor& t, const at::Tensor& x, const char* name) {
  CHECK_SAME_DEVICE(x, t, "x", name);
  CHECK_DTYPE(t, at::kFloat, name);
  TORCH_CHECK_VALUE(t.numel() == 1, "fastssl._C: ", name, " must hold one value, got shape ", shape_of(t));
  return t.data_ptr<float>();
}

fastssl::PairwiseSigmoidProblem make_sigmoid_problem(const at::Tensor& x, const at::Tensor& y, const at::Tensor& scale,
                                                     const at::Tensor& bias, int64_t pos_offset, bool has_pos) {
  check_rows_and_columns(x, y);
  TORCH_CHECK_VALUE(pos_offset >= 0 && pos_offset < y.size(0), "fastssl._C: pos_offset must be in [0, Ny = ",
                    y.size(0), "), got ", pos_offset);
  fastssl::PairwiseSigmoidProblem p;
  p.x = as_matrix(x);
  p.y = as_matrix(y);
  p.scale = device_scalar(scale, x, "scale");
  p.bias = device_scalar(bias, x, "bias");
  p.pos_offset = pos_offset;
  p.has_pos = has_pos;
  return p;
}

// rows (M,) fp32: Σ_j softplus(−label_ij·(scale·x_i·y_j + bias)).
at::Tensor pairwise_sigmoid_forward(const at::Tensor& x, const at::Tensor& y, const at::Tensor& scale,
                                    const at::Tensor& bias, int64_t pos_offset, bool has_pos) {
  const fastssl::PairwiseSigmoidProblem p = make_sigmoid_problem(x, y, scale, bias, pos_offset, has_pos);
  const fastssl::DType dt = dtype_of(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor rows = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  if (x.size(0) == 0) return rows;
  CHECK_CUDA_OK(fastssl::pairwise_sigmoid_forward(p, dt, rows.data_ptr<float>(),
                                                  c10::cuda::getCurrentCUDAStream().stream()));
  return rows;
}

// (dx, dy) in the input dtype and per-row (dlogit, dscale) in fp32, for Σ_i grad_rows_i·rows_i.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pairwise_sigmoid_backward(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& scale, const at::Tensor& bias,
    const at::Tensor& grad_rows, const at::Tensor& grad_absmax, int64_t pos_offset, bool has_pos) {
  const fastssl::PairwiseSigmoidProblem p = make_sigmoid_problem(x, y, scale, bias, pos_offset, has_pos);
  const fastssl::DType dt = dtype_of(x, "x");
  const int64_t m = x.size(0);
  CHECK_SAME_DEVICE(x, grad_rows, "x", "grad_rows");
  CHECK_DTYPE(grad_rows, at::kFloat, "grad_rows");
  CHECK_VECTOR(grad_rows, m, "grad_rows");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty({m, x.size(1)}, x.options());
  at::Tensor dy = at::empty({y.size(0), y.size(1)}, y.options());
  at::Tensor dlogit = at::empty({m}, x.options().dtype(at::kFloat));
  at::Tensor dscale = at::empty({m}, x.options().dtype(at::kFloat));
  if (m == 0) {
    dy.zero_();
    return {dx, dy, dlogit, dscale};
  }
  fastssl::PairwiseSigmoidGrads g;
  g.grad_rows = grad_rows.data_ptr<float>();
  g.grad_absmax = device_scalar(grad_absmax, x, "grad_absmax");
  g.dx = dx.data_ptr();
  g.dy = dy.data_ptr();
  g.dlogit = dlogit.data_ptr<float>();
  g.dscale = dscale.data_ptr<float>();
  CHECK_CUDA_OK(fastssl::pairwise_sigmoid_backward(p, g, dt, c10::cuda::getCurrentCUDAStream().stream()));
  return {dx, dy, dlogit, dscale};
}

// (value (M,) fp32, index (M,) int64): max_j x_i·y_j (j ≠ i when exclude_self) and its first argmax.
std::tuple<at::Tensor, at::Tensor> pairwise_max_forward(const at::Tensor& x, const at::Tensor& y, bool exclude_self) {
  check_rows_and_columns(x, y);
  const fastssl::DType dt = dtype_of(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor value = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  at::Tensor index = at::empty({x.size(0)}, x.options().dtype(at::kLong));
  if (x.size(0) == 0) return {value, index};
  CHECK_CUDA_OK(fastssl::pairwise_max_forward(as_matrix(x), as_matrix(y), exclude_self, dt, value.data_ptr<float>(),
                                              index.data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream().stream()));
  return {value, index};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastssl hand-written CUDA kernels (csrc/); called by fastssl.kernels.cuda, not by users";
  m.def("pairwise_lse_forward", &pairwise_lse_forward, "per-row (lse, pos) in fp32", py::arg("x"), py::arg("y"),
        py::arg("bank"), py::arg("scale"), py::arg("pos_offset"), py::arg("exclude_self"), py::arg("include_pos"),
        py::arg("y_negatives"));
  m.def("pairwise_lse_backward", &pairwise_lse_backward, "(dx, dy) in the input dtype", py::arg("x"), py::arg("y"),
        py::arg("bank"), py::arg("scale"), py::arg("lse"), py::arg("grad_lse"), py::arg("grad_pos"),
        py::arg("grad_lse_absmax"), py::arg("pos_offset"), py::arg("exclude_self"), py::arg("include_pos"),
        py::arg("y_negatives"), py::arg("same"));
#ifdef FASTSSL_WITH_SM90
  m.def("pairwise_lse_forward_sm90", &pairwise_lse_forward_sm90,
        "per-row (lse, pos) in fp32 by the sm_90a kernel where it applies (else the sm_80 one)", py::arg("x"),
        py::arg("y"), py::arg("bank"), py::arg("scale"), py::arg("pos_offset"), py::arg("exclude_self"),
        py::arg("include_pos"), py::arg("y_negatives"));
  m.def("pairwise_lse_backward_sm90", &pairwise_lse_backward_sm90,
        "(dx, dy) by the sm_90a kernels where they apply (else the sm_80 ones)", py::arg("x"), py::arg("y"),
        py::arg("bank"), py::arg("scale"), py::arg("lse"), py::arg("grad_lse"), py::arg("grad_pos"),
        py::arg("grad_lse_absmax"), py::arg("pos_offset"), py::arg("exclude_self"), py::arg("include_pos"),
        py::arg("y_negatives"), py::arg("same"));
  m.def("pairwise_lse_sm90_supported", &pairwise_lse_sm90_supported,
        "whether the sm_90a kernel of `role` ('forward', 'rows': dx, 'cols': dy, 'sym': x = y) takes these inputs",
        py::arg("x"), py::arg("y"), py::arg("bank"), py::arg("role") = "forward");
#endif
  m.def("pairwise_lse_forward_pipelined", &pairwise_lse_forward_pipelined,
        "per-row (lse, pos) in fp32 by the pipelined sm_80+ kernel where it applies", py::arg("x"), py::arg("y"),
        py::arg("bank"), py::arg("scale"), py::arg("pos_offset"), py::arg("exclude_self"), py::arg("include_pos"),
        py::arg("y_negatives"));
  m.def("pairwise_lse_backward_pipelined", &pairwise_lse_backward_pipelined,
        "(dx, dy) by the pipelined sm_80+ kernels where they apply", py::arg("x"),
        py::arg("y"), py::arg("bank"), py::arg("scale"), py::arg("lse"), py::arg("grad_lse"), py::arg("grad_pos"),
        py::arg("grad_lse_absmax"), py::arg("pos_offset"), py::arg("exclude_self"), py::arg("include_pos"),
        py::arg("y_negatives"), py::arg("same"));
  m.def("pairwise_lse_pipelined_supported", &pairwise_lse_pipelined_supported,
        "whether the pipelined sm_80+ kernels take these inputs", py::arg("x"), py::arg("y"), py::arg("bank"));
  m.def("affine_columns", &affine_columns, "per-column (a - shift) * scale, rounded to a's dtype", py::arg("a"),
        py::arg("shift"), py::arg("scale"), py::arg("out_fp32"));
  m.def("sum_product", &sum_product, "deterministic sum of u * v (fp32)", py::arg("u"), py::arg("v"));
#ifdef FASTSSL_WITH_SM90
  m.def("sq_frobenius_forward_sm90", &sq_frobenius_forward_sm90,
        "||a^T b||_F^2 (b None: b is a) in fp32 by the sm_90a fused kernel of the inner or outer route", py::arg("a"),
        py::arg("b"), py::arg("outer"));
  m.def("sq_frobenius_sm90_supported", &sq_frobenius_sm90_supported,
        "whether sq_frobenius_forward_sm90 takes these operands on this route", py::arg("a"), py::arg("b"),
        py::arg("outer"));
#endif
  m.def("worst_pair_forward", &worst_pair_forward, "ArCL's worst pair per sample: (sim fp32, j, k)", py::arg("views"));
  m.def("column_mean_var", &column_mean_var, "per-column mean and variance (fp32)", py::arg("a"),
        py::arg("correction"));
  // pairwise sigmoid (SigLIP) and pairwise max (KoLeo)
  m.def("pairwise_sigmoid_forward", &pairwise_sigmoid_forward, "per-row SigLIP sums (fp32)", py::arg("x"), py::arg("y"),
        py::arg("scale"), py::arg("bias"), py::arg("pos_offset"), py::arg("has_pos"));
  m.def("pairwise_sigmoid_backward", &pairwise_sigmoid_backward,
        "(dx, dy) in the input dtype, per-row (dlogit, dscale) in fp32", py::arg("x"), py::arg("y"), py::arg("scale"),
        py::arg("bias"), py::arg("grad_rows"), py::arg("grad_absmax"), py::arg("pos_offset"), py::arg("has_pos"));
  m.def("pairwise_max_forward", &pairwise_max_forward, "per-row max x_i.y_j (fp32) and its first argmax (int64)",
        py::arg("x"), py::arg("y"), py::arg("exclude_self"));
}
