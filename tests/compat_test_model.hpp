#pragma once
// The fixed nonlinear test model of the compatibility tests, written number for number like
// `test_model` in benchmarks/compare/gen_diffusers_reference.py:
//
//   eps(x, m) = tanh(A x + b (m / 1000) + c) + 0.1 x        for every sample (row) x in R^5,
//
// with m the model time (diffusers: the integer timestep; official DPM-Solver: 1000 (t - 1/N)).
// It is nonlinear in x and in the time, so a scheme that evaluates the model at a wrong state or
// a wrong time, or combines model values with wrong weights, cannot agree with the reference.
//
// Also here: the reader of the reference files in tests/data/compat (format described in
// gen_diffusers_reference.py: whitespace-separated records, one per line).
#include <Eigen/Core>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace diffgrad::testing::compat {

inline constexpr int kModelDim = 5;
inline constexpr double kModelA[kModelDim][kModelDim] = {
    {0.55, -0.30, 0.20, 0.10, -0.15}, {0.12, 0.45, -0.25, 0.30, 0.05},
    {-0.20, 0.10, 0.60, -0.10, 0.25}, {0.30, 0.20, -0.15, 0.50, -0.05},
    {-0.10, 0.25, 0.05, -0.20, 0.40},
};
inline constexpr double kModelB[kModelDim] = {0.8, -0.5, 0.3, 1.2, -0.9};
inline constexpr double kModelC[kModelDim] = {0.1, -0.2, 0.05, 0.0, 0.15};

using Matrix = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// The test network (a NoiseModel: eps(x, model_time, out)). Counts its calls.
struct CompatTestModel {
  int calls = 0;
  template <class State> void eps(const State& x, double model_time, State& out) {
    ++calls;
    if (x.cols() != kModelDim) throw std::invalid_argument("CompatTestModel: expected 5 columns");
    out.resize(x.rows(), x.cols());
    const double m = model_time / 1000.0;
    for (Eigen::Index b = 0; b < x.rows(); ++b)
      for (int j = 0; j < kModelDim; ++j) {
        double z = 0.0;
        for (int l = 0; l < kModelDim; ++l) z += kModelA[j][l] * x(b, l);
        z = z + kModelB[j] * m;
        z = z + kModelC[j];
        out(b, j) = std::tanh(z) + 0.1 * x(b, j);
      }
  }
};

// ---------------------------------------------------------------------------------------------
// Reference files
// ---------------------------------------------------------------------------------------------

struct ReferenceCase {
  std::string name;
  std::map<std::string, std::string> params;
  std::map<std::string, std::vector<double>> vectors; ///< timesteps, times, ...
  std::vector<Matrix> states;                         ///< the sample after every step
  std::vector<Matrix> noise;                          ///< the given noise of every step

  const std::string& param(const std::string& key) const {
    const auto it = params.find(key);
    if (it == params.end())
      throw std::runtime_error("reference case " + name + ": no param '" + key + "'");
    return it->second;
  }
  bool has_param(const std::string& key) const { return params.count(key) != 0; }
  int param_int(const std::string& key) const { return std::stoi(param(key)); }
  double param_double(const std::string& key) const { return std::stod(param(key)); }
  bool param_bool(const std::string& key) const {
    const std::string& v = param(key);
    if (v == "true" || v == "True") return true;
    if (v == "false" || v == "False") return false;
    throw std::runtime_error("reference case " + name + ": param '" + key + "' is not a bool");
  }
  std::vector<int> param_int_list(const std::string& key) const {
    std::vector<int> out;
    std::stringstream ss(param(key));
    std::string item;
    while (std::getline(ss, item, ',')) out.push_back(std::stoi(item));
    return out;
  }
  const std::vector<double>& vector(const std::string& key) const {
    const auto it = vectors.find(key);
    if (it == vectors.end())
      throw std::runtime_error("reference case " + name + ": no record '" + key + "'");
    return it->second;
  }
};

struct ReferenceFile {
  std::map<std::string, std::vector<double>> tables;
  std::map<std::string, Matrix> matrices;
  std::vector<ReferenceCase> cases;
};

/// tests/data/compat/<file>: from DIFFGRAD_TEST_DATA_DIR when the build defines it, else
/// next to this header (the absolute source path the compiler was given).
inline std::string reference_path(const std::string& file) {
#ifdef DIFFGRAD_TEST_DATA_DIR
  return std::string(DIFFGRAD_TEST_DATA_DIR) + "/compat/" + file;
#else
  return (std::filesystem::path(__FILE__).parent_path() / "data" / "compat" / file).string();
#endif
}

namespace detail {
inline Matrix read_matrix(std::istream& in, Eigen::Index rows, Eigen::Index cols) {
  Matrix m(rows, cols);
  for (Eigen::Index r = 0; r < rows; ++r)
    for (Eigen::Index c = 0; c < cols; ++c) in >> m(r, c);
  return m;
}
inline std::vector<Matrix> read_matrices(std::istream& in) {
  int count = 0;
  Eigen::Index rows = 0, cols = 0;
  in >> count >> rows >> cols;
  std::vector<Matrix> out;
  for (int i = 0; i < count; ++i) out.push_back(read_matrix(in, rows, cols));
  return out;
}
inline std::vector<double> read_vector(std::istream& in) {
  std::size_t n = 0;
  in >> n;
  std::vector<double> v(n);
  for (auto& x : v) in >> x;
  return v;
}
} // namespace detail

inline ReferenceFile read_reference(const std::string& file) {
  const std::string path = reference_path(file);
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot open reference file " + path);
  ReferenceFile ref;
  ReferenceCase* current = nullptr;
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    std::istringstream ls(line);
    std::string key;
    ls >> key;
    if (key == "table") {
      std::string name;
      ls >> name;
      ref.tables[name] = detail::read_vector(ls);
    } else if (key == "state") {
      std::string name;
      Eigen::Index rows = 0, cols = 0;
      ls >> name >> rows >> cols;
      ref.matrices[name] = detail::read_matrix(ls, rows, cols);
    } else if (key == "case") {
      ref.cases.emplace_back();
      current = &ref.cases.back();
      ls >> current->name;
    } else if (key == "end") {
      current = nullptr;
    } else {
      if (current == nullptr)
        throw std::runtime_error(path + ": record '" + key + "' outside a case");
      if (key == "param") {
        std::string k, v;
        ls >> k >> v;
        current->params[k] = v;
      } else if (key == "states") {
        current->states = detail::read_matrices(ls);
      } else if (key == "noise") {
        current->noise = detail::read_matrices(ls);
      } else {
        current->vectors[key] = detail::read_vector(ls);
      }
    }
    if (ls.fail()) throw std::runtime_error(path + ": malformed record '" + key + "'");
  }
  if (ref.cases.empty()) throw std::runtime_error(path + ": no cases");
  return ref;
}

/// |a - b|_F / |b|_F.
inline double relative_difference(const Matrix& a, const Matrix& b) {
  return (a - b).norm() / b.norm();
}

} // namespace diffgrad::testing::compat
