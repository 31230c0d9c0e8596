#pragma once
// A grid of small grayscale images (one image per row of a matrix, e.g. 8x8 digits), upscaled
// and separated by a border, written as one PNG:
//
//   examples::ImageGrid grid(8, 8, /*columns=*/8);   // 8x8 tiles, 8 per grid row
//   grid.add_row(samples, "before");                  // B x 64 matrix, values in [-1, 1]
//   grid.write("samples.png");
//
// Rows given a label get it printed to their left (font5x7.hpp), and set_title() adds a line of
// text above the grid, so the figure reads without the terminal output.
// Values are mapped from [lo, hi] (default [-1, 1]: the digits' scaling in digits.hpp) to
// 0..255 with clamping; each pixel becomes a scale x scale block.
#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "font5x7.hpp"
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
  /// Starts a new grid row, then adds every row of `m` (rows beyond `columns` wrap); `label`
  /// is printed left of the first grid row it fills.
  template <class Matrix> void add_row(const Matrix& m, std::string label = "") {
    new_row();
    if (!label.empty()) {
      const std::size_t row = images_.size() / static_cast<std::size_t>(columns_);
      if (labels_.size() <= row) labels_.resize(row + 1);
      labels_[row] = std::move(label);
    }
    for (Eigen::Index b = 0; b < m.rows(); ++b) add(m.row(b));
  }
  /// A line of text above the grid.
  void set_title(std::string title) { title_ = std::move(title); }
  /// Pads the current grid row with blanks so the next image starts a new one.
  void new_row() {
    while (images_.size() % static_cast<std::size_t>(columns_) != 0) images_.emplace_back();
  }

  void write(const std::string& path) const {
    const int cell_w = tile_cols_ * scale_ + kBorder, cell_h = tile_rows_ * scale_ + kBorder;
    const int rows = static_cast<int>((images_.size() + static_cast<std::size_t>(columns_) - 1) /
                                      static_cast<std::size_t>(columns_));
    // Margins for the labels (left) and the title (top), white with black text.
    int label_chars = 0;
    for (const auto& l : labels_) label_chars = std::max(label_chars, static_cast<int>(l.size()));
    const int left = label_chars > 0 ? label_chars * kGlyphWidth * kTextScale + 2 * kPad : 0;
    const int top = title_.empty() ? 0 : kGlyphHeight * kTextScale + 2 * kPad;
    const int grid_w = columns_ * cell_w + kBorder;
    const int width = std::max(left + grid_w, text_width(title_, kTextScale) + 2 * kPad);
    const int height = top + std::max(rows, 1) * cell_h + kBorder;
    std::vector<std::uint8_t> px(static_cast<std::size_t>(width) * static_cast<std::size_t>(height),
                                 255);
    for (int y = top; y < height; ++y)
      for (int x = left; x < left + grid_w; ++x)
        px[static_cast<std::size_t>(y) * static_cast<std::size_t>(width) +
           static_cast<std::size_t>(x)] = kBorderGray;
    if (!title_.empty()) draw_text(px, width, height, 1, kPad, kPad, title_, kTextScale);
    for (std::size_t r = 0; r < labels_.size(); ++r)
      draw_text(px, width, height, 1, kPad,
                top + static_cast<int>(r) * cell_h + kBorder +
                    (tile_rows_ * scale_ - 7 * kTextScale) / 2,
                labels_[r], kTextScale);
    for (std::size_t k = 0; k < images_.size(); ++k) {
      if (images_[k].empty()) continue; // a blank cell
      const int x0 =
          left + static_cast<int>(k % static_cast<std::size_t>(columns_)) * cell_w + kBorder;
      const int y0 =
          top + static_cast<int>(k / static_cast<std::size_t>(columns_)) * cell_h + kBorder;
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
  static constexpr int kTextScale = 2, kPad = 6;
  int tile_rows_, tile_cols_, columns_, scale_;
  double lo_, hi_;
  std::vector<std::vector<double>> images_;
  std::vector<std::string> labels_; ///< per grid row ("" = none)
  std::string title_;
};

} // namespace examples
