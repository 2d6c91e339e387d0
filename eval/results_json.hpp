#pragma once
// Writing docs/results/NAME.json the way every harness of the project does:
// {"device", "date", "commit", "figures": {NAME: {"value", "unit", "how"}}, ...extra sections}.
// The commit comes from --commit or the env HATTN_COMMIT (the device has no git metadata).
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "hattn/core/error.hpp"

namespace hattn::eval {

/// A JSON string literal with the characters JSON requires escaped.
inline std::string json_string(const std::string& s) {
  std::ostringstream o;
  o << '"';
  for (char c : s) {
    if (c == '"' || c == '\\') o << '\\' << c;
    else if (c == '\n') o << "\\n";
    else if (static_cast<unsigned char>(c) < 0x20) o << "\\u" << std::hex << std::setw(4) << std::setfill('0') << int(c) << std::dec;
    else o << c;
  }
  o << '"';
  return o.str();
}

/// A JSON number; NaN and infinities (not JSON) become null.
inline std::string json_number(double v) {
  if (!std::isfinite(v)) return "null";
  std::ostringstream o;
  o << std::setprecision(6) << v;
  return o.str();
}

/// The host CPU's model name (Linux), or "unknown CPU".
inline std::string cpu_model_name() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("model name", 0) == 0) {
      const auto colon = line.find(':');
      if (colon != std::string::npos) return line.substr(line.find_first_not_of(' ', colon + 1));
    }
  return "unknown CPU";
}

inline std::string today_utc() {
  const std::time_t t = std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[16];
  std::strftime(buf, sizeof buf, "%Y-%m-%d", &tm);
  return buf;
}

/// --commit if given, else $HATTN_COMMIT, else "unknown".
inline std::string commit_or_env(const std::string& flag) {
  if (!flag.empty()) return flag;
  const char* env = std::getenv("HATTN_COMMIT");
  return env && *env ? env : "unknown";
}

struct Figure {
  std::string name;
  double value = 0;
  std::string unit;
  std::string how;
};

/// Writes the results file; `extra` holds ("key", raw JSON value) sections after "figures".
inline void write_results(const std::string& path, const std::string& device, const std::string& commit,
                          const std::vector<Figure>& figures,
                          const std::vector<std::pair<std::string, std::string>>& extra = {}) {
  const std::filesystem::path p(path);
  if (p.has_parent_path()) std::filesystem::create_directories(p.parent_path());
  std::ofstream out(path);
  if (!out) throw Error(detail::concat("write_results: cannot open ", path));
  out << "{\n  \"device\": " << json_string(device) << ",\n  \"date\": " << json_string(today_utc())
      << ",\n  \"commit\": " << json_string(commit) << ",\n  \"figures\": {";
  for (std::size_t i = 0; i < figures.size(); ++i) {
    const Figure& f = figures[i];
    out << (i ? ",\n" : "\n") << "    " << json_string(f.name) << ": {\"value\": " << json_number(f.value)
        << ", \"unit\": " << json_string(f.unit) << ", \"how\": " << json_string(f.how) << "}";
  }
  out << "\n  }";
  for (const auto& [key, raw] : extra) out << ",\n  " << json_string(key) << ": " << raw;
  out << "\n}\n";
}

}  // namespace hattn::eval
