#pragma once
// A tiny command-line parser for the examples: every option has a type, a default and a help
// line, and --help prints them all (with the defaults read from the variables themselves, so
// the help text cannot go stale).
//
//   examples::Cli cli("guide", "Optimise x_T through the sampler ...");
//   int steps = 25;
//   cli.option("--steps", steps, "sampler steps");
//   if (!cli.parse(argc, argv)) return 2;   // --help exits 0; a bad option prints why
//
// Values are read strictly: the whole text must be the number (no leading or trailing spaces,
// no sign on unsigned options), integers must fit their type and the option's range
// (`cli.option("--steps", steps, "...", 1)` sets a minimum, a fifth argument a maximum), and
// floating-point values must be finite and in range. Anything else is refused with a message
// naming the option, the expected range and the text given: `--steps 4294967297` must not run
// one step (wrap-around), `--seed ' -1'` must not slip past a sign check, `--lr 1e999` must not
// become inf.
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <sstream>
#include <string>
#include <system_error>
#include <type_traits>
#include <variant>
#include <vector>

namespace examples {

class Cli {
public:
  Cli(std::string program, std::string description)
      : program_(std::move(program)), description_(std::move(description)) {}

  /// Integer and floating-point options, optionally restricted to [lo, hi] (inclusive).
  void option(const char* name, int& value, const char* help,
              int lo = std::numeric_limits<int>::min(), int hi = std::numeric_limits<int>::max()) {
    add(name, &value, help, Range{static_cast<double>(lo), static_cast<double>(hi)});
  }
  void option(const char* name, std::uint64_t& value, const char* help) {
    add(name, &value, help, Range{0, 0});
  }
  void option(const char* name, double& value, const char* help,
              double lo = -std::numeric_limits<double>::max(),
              double hi = std::numeric_limits<double>::max()) {
    add(name, &value, help, Range{lo, hi});
  }
  void option(const char* name, std::string& value, const char* help) { add(name, &value, help); }
  /// A flag: present = true (takes no value).
  void flag(const char* name, bool& value, const char* help) { add(name, &value, help); }

  /// Parses argv. --help / -h prints the usage and exits 0. Returns false (after printing
  /// the reason and the usage to stderr) for an unknown option, a missing or bad value.
  bool parse(int argc, char** argv) {
    for (int i = 1; i < argc; ++i) {
      const std::string arg = argv[i];
      if (arg == "--help" || arg == "-h") {
        print_usage(stdout);
        std::exit(0);
      }
      Option* opt = find(arg);
      if (opt == nullptr) return fail("unknown option '" + arg + "'");
      if (std::holds_alternative<bool*>(opt->target)) {
        *std::get<bool*>(opt->target) = true;
        continue;
      }
      if (i + 1 >= argc) return fail("option '" + arg + "' needs a value");
      const std::string value = argv[++i];
      const std::string why = assign(*opt, value);
      if (!why.empty())
        return fail("option '" + arg + "': expected " + why + ", got '" + value + "'");
    }
    return true;
  }

  void print_usage(std::FILE* out) const {
    std::fprintf(out, "usage: %s [options]\n%s\n\noptions:\n", program_.c_str(),
                 description_.c_str());
    for (const auto& o : options_) {
      const std::string shown =
          std::holds_alternative<bool*>(o.target) ? o.name : o.name + " <value>";
      // A range narrower than the type's own is part of the help.
      std::string range;
      if (std::holds_alternative<int*>(o.target)) {
        Range r = o.range;
        if (r.lo <= std::numeric_limits<int>::min()) r.lo = -std::numeric_limits<double>::max();
        if (r.hi >= std::numeric_limits<int>::max()) r.hi = std::numeric_limits<double>::max();
        range = range_text(r);
      } else if (std::holds_alternative<double*>(o.target)) {
        range = range_text(o.range);
      }
      if (!range.empty()) range = "," + range; // "(default: 25, >= 2)"
      std::fprintf(out, "  %-22s %s (default: %s%s)\n", shown.c_str(), o.help.c_str(),
                   o.default_text.c_str(), range.c_str());
    }
    std::fprintf(out, "  %-22s %s\n", "--help", "print this text and exit");
  }

private:
  using Target = std::variant<int*, std::uint64_t*, double*, std::string*, bool*>;
  /// Inclusive bounds of a numeric option (int: exact in a double; uint64: its whole range).
  // No default member initializers: clang refuses them in a default argument of the enclosing
  // class (add()'s `range`) while that class is still being defined.
  struct Range {
    double lo, hi;
  };
  struct Option {
    std::string name, help, default_text;
    Target target;
    Range range{0, 0};
  };

  template <class T>
  void add(const char* name, T* value, const char* help, Range range = Range{0, 0}) {
    std::ostringstream def;
    if constexpr (std::is_same_v<T, bool>)
      def << (*value ? "on" : "off");
    else if constexpr (std::is_same_v<T, std::string>)
      def << (value->empty() ? "\"\"" : *value);
    else
      def << *value;
    options_.push_back(Option{name, help, def.str(), Target(value), range});
  }

  Option* find(const std::string& name) {
    for (auto& o : options_)
      if (o.name == name) return &o;
    return nullptr;
  }

  static std::string number_text(double v) {
    std::ostringstream os;
    os.precision(17);
    os << v;
    return os.str();
  }

  /// " in [lo, hi]", " >= lo", " <= hi" or "" (a bound at the double's own limit is not shown).
  static std::string range_text(const Range& r) {
    const bool has_lo = r.lo > -std::numeric_limits<double>::max();
    const bool has_hi = r.hi < std::numeric_limits<double>::max();
    if (has_lo && has_hi) return " in [" + number_text(r.lo) + ", " + number_text(r.hi) + "]";
    if (has_lo) return " >= " + number_text(r.lo);
    if (has_hi) return " <= " + number_text(r.hi);
    return "";
  }

  /// Reads `text` into the option's variable. Returns "" on success, else what was expected.
  static std::string assign(Option& o, const std::string& text) {
    const char* first = text.data();
    const char* last = text.data() + text.size();
    if (auto* p = std::get_if<int*>(&o.target)) {
      const std::string expected =
          "an integer in [" + number_text(o.range.lo) + ", " + number_text(o.range.hi) + "]";
      // std::from_chars: no whitespace, no '+', and out-of-range is reported, never wrapped.
      long long v = 0;
      const auto [end, ec] = std::from_chars(first, last, v);
      if (ec != std::errc() || end != last || text.empty()) return expected;
      if (static_cast<double>(v) < o.range.lo || static_cast<double>(v) > o.range.hi)
        return expected;
      **p = static_cast<int>(v);
    } else if (auto* u = std::get_if<std::uint64_t*>(&o.target)) {
      const std::string expected = "an unsigned integer in [0, " +
                                   std::to_string(std::numeric_limits<std::uint64_t>::max()) + "]";
      std::uint64_t v = 0;
      const auto [end, ec] = std::from_chars(first, last, v); // rejects '-' (no wrap)
      if (ec != std::errc() || end != last || text.empty()) return expected;
      **u = v;
    } else if (auto* d = std::get_if<double*>(&o.target)) {
      const std::string expected = "a finite number" + range_text(o.range);
      double v = 0;
      const auto [end, ec] = std::from_chars(first, last, v); // 1e999: result_out_of_range
      if (ec != std::errc() || end != last || text.empty() || !std::isfinite(v)) return expected;
      if (v < o.range.lo || v > o.range.hi) return expected;
      **d = v;
    } else if (auto* s = std::get_if<std::string*>(&o.target)) {
      **s = text;
    }
    return "";
  }

  bool fail(const std::string& why) const {
    std::fprintf(stderr, "%s: %s\n\n", program_.c_str(), why.c_str());
    print_usage(stderr);
    return false;
  }

  std::string program_, description_;
  std::vector<Option> options_;
};

} // namespace examples
