#pragma once
// The 8x8 handwritten digits of scikit-learn, committed as data/digits/digits.txt (format and
// license: data/digits/README.md), loaded as a K x 64 matrix with pixels scaled from 0..16 to
// [-1, 1] (the usual diffusion-model data range):
//
//   const auto digits = examples::load_digits();          // all 1797 images
//   digits.images.row(i), digits.labels[i]
//   const auto few = examples::subset_per_class(digits, 50);   // 50 per class, file order
#include <Eigen/Core>
#include <array>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace examples {

#ifndef DIFFGRAD_DIGITS_FILE
#define DIFFGRAD_DIGITS_FILE "data/digits/digits.txt"
#endif

/// The path compiled in by examples/CMakeLists.txt (the repository's data/digits/digits.txt).
inline std::string default_digits_path() { return DIFFGRAD_DIGITS_FILE; }

struct Digits {
  using Matrix = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  Matrix images;            ///< K x (rows*cols), values in [-1, 1]
  std::vector<int> labels;  ///< K labels 0..9
  int rows = 8, cols = 8;
  Eigen::Index size() const { return images.rows(); }
  int dim() const { return rows * cols; }
};

/// Pixel value 0..16 -> [-1, 1].
inline double scale_pixel(int v) { return v / 8.0 - 1.0; }

inline Digits load_digits(const std::string& path = default_digits_path()) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("load_digits: cannot open '" + path + "' (pass --data PATH)");
  std::string line;
  int count = -1;
  Digits d;
  std::vector<std::string> rows;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    if (count < 0) {
      std::istringstream head(line);
      std::string magic;
      int version = 0;
      if (!(head >> magic >> version >> count >> d.rows >> d.cols) || magic != "diffgrad-digits" ||
          version != 1 || count < 1)
        throw std::runtime_error("load_digits: '" + path +
                                 "' does not start with 'diffgrad-digits 1 <count> <rows> <cols>'");
      continue;
    }
    rows.push_back(line);
  }
  if (static_cast<int>(rows.size()) != count)
    throw std::runtime_error("load_digits: '" + path + "' announces " + std::to_string(count) +
                             " images but holds " + std::to_string(rows.size()));
  const int dim = d.rows * d.cols;
  d.images.resize(count, dim);
  d.labels.resize(static_cast<std::size_t>(count));
  for (int i = 0; i < count; ++i) {
    std::istringstream row(rows[static_cast<std::size_t>(i)]);
    std::string pixels;
    int label = -1;
    if (!(row >> label >> pixels) || label < 0 || label > 9 ||
        static_cast<int>(pixels.size()) != dim)
      throw std::runtime_error("load_digits: bad image line " + std::to_string(i + 1) + " in '" +
                               path + "'");
    d.labels[static_cast<std::size_t>(i)] = label;
    for (int j = 0; j < dim; ++j) {
      const char c = pixels[static_cast<std::size_t>(j)];
      const int v = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'g' ? c - 'a' + 10 : -1;
      if (v < 0)
        throw std::runtime_error("load_digits: bad pixel character in line " +
                                 std::to_string(i + 1) + " of '" + path + "'");
      d.images(i, j) = scale_pixel(v);
    }
  }
  return d;
}

/// The first `per_class` images of each class (file order), grouped by class 0..9.
inline Digits subset_per_class(const Digits& all, int per_class) {
  Digits out;
  out.rows = all.rows;
  out.cols = all.cols;
  std::vector<Eigen::Index> picked;
  for (int c = 0; c <= 9; ++c) {
    int taken = 0;
    for (Eigen::Index i = 0; i < all.size() && taken < per_class; ++i)
      if (all.labels[static_cast<std::size_t>(i)] == c) {
        picked.push_back(i);
        ++taken;
      }
  }
  out.images.resize(static_cast<Eigen::Index>(picked.size()), all.dim());
  out.labels.resize(picked.size());
  for (std::size_t k = 0; k < picked.size(); ++k) {
    out.images.row(static_cast<Eigen::Index>(k)) = all.images.row(picked[k]);
    out.labels[k] = all.labels[static_cast<std::size_t>(picked[k])];
  }
  return out;
}

} // namespace examples
