// One Catch2 main for every test executable, compiled once. Catch2 v2 writes main() itself
// (CATCH_CONFIG_MAIN); with Catch2 v3, <catch2/catch.hpp> is tests/catch2_shim's and main() is
// written here, because v3's own Catch2WithMain is not in every distribution's package.
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>

#if CATCH_VERSION_MAJOR >= 3
int main(int argc, char* argv[]) { return Catch::Session().run(argc, argv); }
#endif
