#pragma once
// diffgrad version. CMake parses these three macros; keep their format.
#define DIFFGRAD_VERSION_MAJOR 0
#define DIFFGRAD_VERSION_MINOR 6
#define DIFFGRAD_VERSION_PATCH 0

#define DIFFGRAD_VERSION_STRING "0.6.0"
