#pragma once
// A grid of small grayscale images (one image per row of a matrix, e.g. 8x8 digits), upscaled
// and separated by a border, written as one PNG:
//
//   examples::ImageGrid grid(8, 8, /*columns=*/8);   // 8x8 tiles, 8 per grid row
//   grid.add_row(samples);                            // B x 64 matrix, values in [-1, 1]
//   grid.write("samples.png");
//
// Values are mapped from [lo, hi] (default [-1, 1]: the digits' scaling in digits.hpp) to
// 0..255 with clamping; each pixel becomes a scale x scale block.
#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "png_writer.hpp"

namespace examples {

class ImageGrid {
public:
  ImageGrid(int tile_rows, int tile_cols, int columns, int scale = 8, double lo = -1.0,
            double hi = 1.0)
      : tile_rows_(tile_rows), tile_cols_(tile_cols), columns_(columns), scale_(scale), lo_(lo),
        hi_(hi) {}

  /// Appends one image (tile_rows * tile_cols values, row-major) in the next free cell.
  template <class Row> void add(const Row& image) {
    std::vector<double> v(static_cast<std::size_t>(tile_rows_ * tile_cols_));
    for (std::size_t i = 0; i < v.size(); ++i) v[i] = static_cast<double>(image(Eigen::Index(i)));
    images_.push_back(std::move(v));
  }
  /// Starts a new grid row, then adds every row of `m` (rows beyond `columns` wrap).
  template <class Matrix> void add_row(const Matrix& m) {
    new_row();
    for (Eigen::Index b = 0; b < m.rows(); ++b) add(m.row(b));
  }
  /// Pads the current grid row with blanks so the next image starts a new one.
  void new_row() {
    while (images_.size() % static_cast<std::size_t>(columns_) != 0) images_.emplace_back();
  }

  void write(const std::string& path) const {
    const int cell_w = tile_cols_ * scale_ + kBorder, cell_h = tile_rows_ * scale_ + kBorder;
    const int rows =
        static_cast<int>((images_.size() + static_cast<std::size_t>(columns_) - 1) /
                         static_cast<std::size_t>(columns_));
    const int width = columns_ * cell_w + kBorder, height = std::max(rows, 1) * cell_h + kBorder;
    std::vector<std::uint8_t> px(static_cast<std::size_t>(width) * static_cast<std::size_t>(height),
                                 kBorderGray);
    for (std::size_t k = 0; k < images_.size(); ++k) {
      if (images_[k].empty()) continue;  // a blank cell
      const int x0 = static_cast<int>(k % static_cast<std::size_t>(columns_)) * cell_w + kBorder;
      const int y0 = static_cast<int>(k / static_cast<std::size_t>(columns_)) * cell_h + kBorder;
      for (int r = 0; r < tile_rows_ * scale_; ++r)
        for (int c = 0; c < tile_cols_ * scale_; ++c) {
          const double v =
              images_[k][static_cast<std::size_t>((r / scale_) * tile_cols_ + c / scale_)];
          const double u = std::clamp((v - lo_) / (hi_ - lo_), 0.0, 1.0);
          px[static_cast<std::size_t>(y0 + r) * static_cast<std::size_t>(width) +
             static_cast<std::size_t>(x0 + c)] = static_cast<std::uint8_t>(std::lround(255 * u));
        }
    }
    write_png(path, width, height, 1, px);
  }

private:
  static constexpr int kBorder = 2;
  static constexpr std::uint8_t kBorderGray = 96;
  int tile_rows_, tile_cols_, columns_, scale_;
  double lo_, hi_;
  std::vector<std::vector<double>> images_;
};

} // namespace examples
