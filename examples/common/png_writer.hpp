#pragma once
// Writes 8-bit grayscale or RGB PNG files through libpng (Debian: libpng-dev; CMake:
// find_package(PNG), target PNG::PNG).
//
//   examples::write_png("out.png", width, height, 1, pixels);   // 1 = gray, 3 = RGB
//
// `pixels` is row-major, `channels` bytes per pixel, width * height * channels bytes.
// Throws std::runtime_error with the path and the reason on any failure.
#include <png.h>

#include <cstdint>
#include <cstdio>
#include <memory>
#include <span>
#include <stdexcept>
#include <string>

namespace examples {

inline void write_png(const std::string& path, int width, int height, int channels,
                      std::span<const std::uint8_t> pixels) {
  if (width < 1 || height < 1 || (channels != 1 && channels != 3))
    throw std::runtime_error("write_png: expected width, height >= 1 and 1 or 3 channels for " +
                             path);
  const auto stride = static_cast<std::size_t>(width) * static_cast<std::size_t>(channels);
  if (pixels.size() != stride * static_cast<std::size_t>(height))
    throw std::runtime_error("write_png: expected width * height * channels bytes for " + path);

  std::unique_ptr<std::FILE, int (*)(std::FILE*)> file(std::fopen(path.c_str(), "wb"),
                                                       &std::fclose);
  if (!file) throw std::runtime_error("write_png: cannot open " + path + " for writing");
  png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, nullptr, nullptr, nullptr);
  if (png == nullptr) throw std::runtime_error("write_png: png_create_write_struct failed");
  png_infop info = png_create_info_struct(png);
  if (info == nullptr) {
    png_destroy_write_struct(&png, nullptr);
    throw std::runtime_error("write_png: png_create_info_struct failed");
  }
  // libpng reports errors by longjmp; nothing with a destructor is created past this point.
  if (setjmp(png_jmpbuf(png))) {
    png_destroy_write_struct(&png, &info);
    throw std::runtime_error("write_png: libpng failed while writing " + path);
  }
  png_init_io(png, file.get());
  png_set_IHDR(png, info, static_cast<png_uint_32>(width), static_cast<png_uint_32>(height), 8,
               channels == 1 ? PNG_COLOR_TYPE_GRAY : PNG_COLOR_TYPE_RGB, PNG_INTERLACE_NONE,
               PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
  png_write_info(png, info);
  for (int r = 0; r < height; ++r)
    png_write_row(png, pixels.data() + static_cast<std::size_t>(r) * stride);
  png_write_end(png, nullptr);
  png_destroy_write_struct(&png, &info);
}

} // namespace examples
