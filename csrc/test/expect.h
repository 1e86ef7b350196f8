// The check macro of the framework-free C++ tests: EXPECT(cond, printf-style message) counts a failure and prints
// the first 20 with their file and line; a test's main returns 1 when expect_failures is not 0.
#pragma once

#include <cstdio>

inline int expect_failures = 0;

#define EXPECT(cond, ...)                                           \
  do {                                                              \
    if (!(cond) && ++expect_failures <= 20) {                       \
      std::fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);     \
      std::fprintf(stderr, __VA_ARGS__);                            \
      std::fprintf(stderr, "\n");                                   \
    }                                                               \
  } while (0)
