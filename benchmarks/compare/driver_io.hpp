#pragma once
// Shared by the C++ drivers that benchmarks/compare/*.py call: "--key value" arguments, dense
// matrices as text (first line "rows cols", then row-major values with 17 significant digits,
// so doubles round-trip exactly), peak-memory measurement (examples/common/memory.hpp) and a
// one-line JSON result on stdout.
#include <Eigen/Core>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <map>
#include <span>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/memory.hpp"
#include "diffgrad/gradients/reverse_stepper.hpp"
#include "diffgrad/schedule/node.hpp"

namespace driver {

using Matrix = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

class Args {
public:
  Args(int argc, char** argv) {
    for (int i = 1; i < argc; ++i) {
      const std::string key = argv[i];
      if (key.rfind("--", 0) != 0 || i + 1 >= argc)
        throw std::runtime_error("expected --key value pairs, got '" + key + "'");
      kv_[key.substr(2)] = argv[++i];
    }
  }
  std::string str(const std::string& key, const std::string& fallback = "") const {
    const auto it = kv_.find(key);
    if (it != kv_.end()) return it->second;
    if (fallback.empty()) throw std::runtime_error("missing argument --" + key);
    return fallback;
  }
  bool has(const std::string& key) const { return kv_.contains(key); }
  int integer(const std::string& key, int fallback) const {
    return has(key) ? std::stoi(kv_.at(key)) : fallback;
  }
  double real(const std::string& key, double fallback) const {
    return has(key) ? std::stod(kv_.at(key)) : fallback;
  }

private:
  std::map<std::string, std::string> kv_;
};

inline Matrix read_matrix(const std::string& path) {
  std::ifstream in(path);
  long rows = 0, cols = 0;
  if (!(in >> rows >> cols) || rows < 1 || cols < 1)
    throw std::runtime_error("read_matrix: '" + path + "' does not start with 'rows cols'");
  Matrix m(rows, cols);
  for (long i = 0; i < rows * cols; ++i)
    if (!(in >> m.data()[i])) throw std::runtime_error("read_matrix: '" + path + "' is short");
  return m;
}

template <class M> void write_matrix(const std::string& path, const M& m) {
  std::FILE* f = std::fopen(path.c_str(), "w");
  if (f == nullptr) throw std::runtime_error("write_matrix: cannot write '" + path + "'");
  std::fprintf(f, "%ld %ld\n", static_cast<long>(m.rows()), static_cast<long>(m.cols()));
  for (Eigen::Index i = 0; i < m.rows(); ++i)
    for (Eigen::Index j = 0; j < m.cols(); ++j)
      std::fprintf(f, "%.17g%c", static_cast<double>(m(i, j)), j + 1 == m.cols() ? '\n' : ' ');
  std::fclose(f);
}

/// Peak resident growth from construction to growth_mib(): free heap pages are returned to the
/// kernel first (so reusing them counts), then the peak is reset.
class PeakMeter {
public:
  PeakMeter()
      : ok_((examples::release_free_heap(), examples::reset_peak_rss())),
        start_(examples::proc_status_bytes("VmRSS")) {}
  double growth_mib() const {
    const long long peak = examples::proc_status_bytes("VmHWM");
    if (!ok_ || peak < 0 || start_ < 0) return -1;
    return static_cast<double>(peak - start_) / 1048576.0;
  }

private:
  bool ok_;
  long long start_;
};

inline double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n == 0 ? 0.0 : n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/// {"key": value, ...} on one line.
class Json {
public:
  Json& add(const std::string& key, double value) {
    std::ostringstream os;
    os.precision(17);
    os << value;
    items_.push_back("\"" + key + "\": " + os.str());
    return *this;
  }
  Json& add(const std::string& key, const std::string& value) {
    items_.push_back("\"" + key + "\": \"" + value + "\"");
    return *this;
  }
  void print() const {
    std::string s = "{";
    for (std::size_t i = 0; i < items_.size(); ++i) s += (i ? ", " : "") + items_[i];
    std::printf("%s}\n", s.c_str());
    std::fflush(stdout);
  }

private:
  std::vector<std::string> items_;
};

/// Writes the nodes as an N x 4 matrix of (alpha, sigma, lambda, model_t): the Python side
/// rebuilds the same steps from it.
inline void write_nodes(const std::string& path, std::span<const diffgrad::Node> nodes) {
  Matrix m(static_cast<Eigen::Index>(nodes.size()), 4);
  for (std::size_t i = 0; i < nodes.size(); ++i)
    m.row(static_cast<Eigen::Index>(i)) << nodes[i].alpha, nodes[i].sigma, nodes[i].lambda,
        nodes[i].model_t;
  write_matrix(path, m);
}

/// --memory store_all|checkpoint|recompute (default store_all), --snapshots k (checkpoint; 5).
inline diffgrad::MemoryMode memory_mode(const Args& a) {
  const std::string memory = a.str("memory", "store_all");
  if (memory == "checkpoint") return diffgrad::MemoryMode::checkpoint(a.integer("snapshots", 5));
  if (memory == "recompute") return diffgrad::MemoryMode::recompute();
  if (memory != "store_all") throw std::runtime_error("unknown --memory " + memory);
  return diffgrad::MemoryMode::store_all();
}

} // namespace driver
