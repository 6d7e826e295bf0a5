// A C++ user of the tie C API: a small RAII wrapper and one prediction per line of input.
//
//   predict SOCKET_DIR ENDPOINT MODEL < rows.txt
//
// Each input line holds one row of features separated by spaces; each output line holds the
// row's outputs, or the error.
#include <cstdio>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "tie.h"

class Client {
 public:
  Client(const std::string& socket_dir, const std::string& endpoint, const std::string& model) {
    TieConnectOptions options{};
    options.socket_dir = socket_dir.c_str();
    if (tie_connect(endpoint.c_str(), model.c_str(), &options, &client_) != TIE_OK)
      throw std::runtime_error(tie_last_error());
  }
  ~Client() { tie_client_free(client_); }
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  unsigned features() const { return tie_feature_count(client_); }

  std::vector<float> predict(const std::vector<float>& row) {
    TieResponse response{};
    TieResult r = tie_predict(client_, row.data(), row.size(), &response);
    if (r != TIE_OK) throw std::runtime_error(tie_last_error());
    return std::vector<float>(response.outputs, response.outputs + response.output_count);
  }

 private:
  TieClient* client_ = nullptr;
};

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: " << argv[0] << " SOCKET_DIR ENDPOINT MODEL < rows.txt\n";
    return 2;
  }
  try {
    Client client(argv[1], argv[2], argv[3]);
    std::string line;
    while (std::getline(std::cin, line)) {
      std::istringstream in(line);
      std::vector<float> row;
      for (float v; in >> v;) row.push_back(v);
      if (row.empty()) continue;
      try {
        for (float v : client.predict(row)) std::printf("%.9g ", v);
        std::printf("\n");
      } catch (const std::exception& e) {
        std::printf("error: %s\n", e.what());
      }
    }
  } catch (const std::exception& e) {
    std::cerr << "connect: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
