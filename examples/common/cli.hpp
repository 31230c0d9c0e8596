#pragma once
// A tiny command-line parser for the examples: every option has a type, a default and a help
// line, and --help prints them all (with the defaults read from the variables themselves, so
// the help text cannot go stale).
//
//   examples::Cli cli("guide", "Optimise x_T through the sampler ...");
//   int steps = 25;
//   cli.option("--steps", steps, "sampler steps");
//   if (!cli.parse(argc, argv)) return 2;   // --help exits 0; a bad option prints why
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>
#include <variant>
#include <vector>

namespace examples {

class Cli {
public:
  Cli(std::string program, std::string description)
      : program_(std::move(program)), description_(std::move(description)) {}

  void option(const char* name, int& value, const char* help) { add(name, &value, help); }
  void option(const char* name, std::uint64_t& value, const char* help) { add(name, &value, help); }
  void option(const char* name, double& value, const char* help) { add(name, &value, help); }
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
      if (!assign(*opt, value)) return fail("option '" + arg + "': cannot read '" + value + "'");
    }
    return true;
  }

  void print_usage(std::FILE* out) const {
    std::fprintf(out, "usage: %s [options]\n%s\n\noptions:\n", program_.c_str(),
                 description_.c_str());
    for (const auto& o : options_) {
      const std::string shown =
          std::holds_alternative<bool*>(o.target) ? o.name : o.name + " <value>";
      std::fprintf(out, "  %-22s %s (default: %s)\n", shown.c_str(), o.help.c_str(),
                   o.default_text.c_str());
    }
    std::fprintf(out, "  %-22s %s\n", "--help", "print this text and exit");
  }

private:
  using Target = std::variant<int*, std::uint64_t*, double*, std::string*, bool*>;
  struct Option {
    std::string name, help, default_text;
    Target target;
  };

  template <class T> void add(const char* name, T* value, const char* help) {
    std::ostringstream def;
    if constexpr (std::is_same_v<T, bool>)
      def << (*value ? "on" : "off");
    else if constexpr (std::is_same_v<T, std::string>)
      def << (value->empty() ? "\"\"" : *value);
    else
      def << *value;
    options_.push_back(Option{name, help, def.str(), Target(value)});
  }

  Option* find(const std::string& name) {
    for (auto& o : options_)
      if (o.name == name) return &o;
    return nullptr;
  }

  static bool assign(Option& o, const std::string& text) {
    char* end = nullptr;
    if (auto* p = std::get_if<int*>(&o.target)) {
      const long v = std::strtol(text.c_str(), &end, 10);
      if (end == text.c_str() || *end != '\0') return false;
      **p = static_cast<int>(v);
    } else if (auto* u = std::get_if<std::uint64_t*>(&o.target)) {
      if (text.empty() || text[0] == '-') return false; // strtoull would wrap a negative value
      const unsigned long long v = std::strtoull(text.c_str(), &end, 10);
      if (end == text.c_str() || *end != '\0') return false;
      **u = static_cast<std::uint64_t>(v);
    } else if (auto* d = std::get_if<double*>(&o.target)) {
      const double v = std::strtod(text.c_str(), &end);
      if (end == text.c_str() || *end != '\0') return false;
      **d = v;
    } else if (auto* s = std::get_if<std::string*>(&o.target)) {
      **s = text;
    }
    return true;
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
