#pragma once
// Writes 8-bit grayscale or RGB PNG files through libpng (Debian: libpng-dev; CMake:
// find_package(PNG), target PNG::PNG).
//
//   examples::write_png("out.png", width, height, 1, pixels);   // 1 = gray, 3 = RGB
//
// `pixels` is row-major, `channels` bytes per pixel, width * height * channels bytes.
// Throws std::runtime_error with the path and the reason on any failure, including a short
// write or a failed close (a full disk): a failed file is removed, never left truncated.
#include <png.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <span>
#include <stdexcept>
#include <string>

// Where the examples write their PNGs by default: the build tree's examples/ folder (CMake
// defines DIFFGRAD_EXAMPLES_OUTPUT_DIR), never the directory the command is run from, which is
// the repository root when following the README. --out / --out-dir override it.
#ifndef DIFFGRAD_EXAMPLES_OUTPUT_DIR
#define DIFFGRAD_EXAMPLES_OUTPUT_DIR "."
#endif

namespace examples {

inline std::string default_output_dir() { return DIFFGRAD_EXAMPLES_OUTPUT_DIR; }
inline std::string default_output_path(const std::string& file) {
  return default_output_dir() + "/" + file;
}

inline void write_png(const std::string& path, int width, int height, int channels,
                      std::span<const std::uint8_t> pixels) {
  if (width < 1 || height < 1 || (channels != 1 && channels != 3))
    throw std::runtime_error("write_png: expected width, height >= 1 and 1 or 3 channels for " +
                             path);
  const auto stride = static_cast<std::size_t>(width) * static_cast<std::size_t>(channels);
  if (pixels.size() != stride * static_cast<std::size_t>(height))
    throw std::runtime_error("write_png: expected width * height * channels bytes for " + path);

  std::FILE* file = std::fopen(path.c_str(), "wb");
  if (file == nullptr)
    throw std::runtime_error("write_png: cannot open " + path +
                             " for writing: " + std::strerror(errno));
  // libpng writes through stdio buffers, so a full disk usually surfaces only at fflush or
  // fclose: both results are checked, and a failed file is removed rather than left truncated.
  const auto discard = [&] {
    std::error_code ec; // only a regular file is removed: never /dev/full or a pipe
    if (std::filesystem::is_regular_file(path, ec)) std::filesystem::remove(path, ec);
  };
  const auto fail = [&](const std::string& why) {
    std::fclose(file);
    discard();
    throw std::runtime_error("write_png: " + why + " while writing " + path);
  };
  png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, nullptr, nullptr, nullptr);
  if (png == nullptr) fail("png_create_write_struct failed");
  png_infop info = png_create_info_struct(png);
  if (info == nullptr) {
    png_destroy_write_struct(&png, nullptr);
    fail("png_create_info_struct failed");
  }
  // libpng reports errors by longjmp; nothing with a destructor is created past this point.
  if (setjmp(png_jmpbuf(png))) {
    png_destroy_write_struct(&png, &info);
    fail("libpng failed (short write?)");
  }
  png_init_io(png, file);
  png_set_IHDR(png, info, static_cast<png_uint_32>(width), static_cast<png_uint_32>(height), 8,
               channels == 1 ? PNG_COLOR_TYPE_GRAY : PNG_COLOR_TYPE_RGB, PNG_INTERLACE_NONE,
               PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
  png_write_info(png, info);
  for (int r = 0; r < height; ++r)
    png_write_row(png, pixels.data() + static_cast<std::size_t>(r) * stride);
  png_write_end(png, nullptr);
  png_destroy_write_struct(&png, &info);
  // libpng's default write callback ignores fwrite's result: check the stream's error flag,
  // then flush and close explicitly (ENOSPC appears here on a full disk, e.g. /dev/full).
  errno = 0;
  if (std::ferror(file) != 0 || std::fflush(file) != 0)
    fail(std::string("write error: ") + (errno != 0 ? std::strerror(errno) : "stream error"));
  if (std::fclose(file) != 0) {
    const std::string why = std::strerror(errno);
    discard();
    throw std::runtime_error("write_png: closing " + path + " failed: " + why);
  }
}

} // namespace examples
